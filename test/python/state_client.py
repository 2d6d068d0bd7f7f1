"""Second-language client check of the StateManagerService wire contract.

Usage: state_client.py ADDRESS [--verify-only | --large]

Saves a known SystemState to the daemon at ADDRESS, loads it back, compares
every field, reads the sync status and prints one JSON line with the results.
With --verify-only it skips the save and expects the state that an earlier run
saved, as a daemon restarted on the same storage must return it. With --large
it saves 50,000 models and reads them back through LoadStream with gRPC's
default 4 MiB receive limit.

The stubs come from Debian's protoc and grpc_python_plugin; run it with
PYTHONPATH set to their output folder. Exits 0 when everything matches, 1 on a
mismatch and 2 on a failed call, with the reason on stderr.
"""

import json
import sys

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor

from modelmesh.state.v1 import state_manager_service_pb2 as service_pb2
from modelmesh.state.v1 import state_manager_service_pb2_grpc as service_pb2_grpc
from modelmesh.state.v1 import changes_pb2
from modelmesh.state.v1 import lock_pb2
from modelmesh.state.v1 import state_pb2

CALL_TIMEOUT_SECONDS = 10
# Above 2**53, so a client or server that passes int64 through a double loses it.
LARGE_TOKEN_COUNT = 2**60 + 1
EXPECTED_CONNECTOR = "modelmesh.etcd.v1"


class CheckFailed(Exception):
    """A response that does not match what the client saved or expects."""


def timestamp(seconds, nanos):
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def build_expected_state():
    """Return the SystemState that this client saves and expects back."""
    state = state_pb2.SystemState()
    state.timestamp.CopyFrom(timestamp(1_767_225_600, 123_456_789))

    primary = state.models["openai/gpt-4o"]
    primary.status = state_pb2.MODEL_STATUS_ACTIVE
    primary.failure_count = 3
    primary.error_rate = 0.125
    primary.cooldown_remaining = 0.0
    primary.quota_used = 4_200
    primary.tokens_used = LARGE_TOKEN_COUNT
    primary.cost_accumulated = 12.75
    primary.last_request.CopyFrom(timestamp(1_767_225_590, 1))
    primary.last_failure.CopyFrom(timestamp(1_767_225_000, 999_999_999))

    reserve = state.models["anthropic/claude-sonnet"]
    reserve.status = state_pb2.MODEL_STATUS_STANDBY
    reserve.failure_count = 17
    reserve.error_rate = 0.75
    reserve.cooldown_remaining = 42.5
    reserve.quota_used = 9_000_000_000
    reserve.tokens_used = LARGE_TOKEN_COUNT
    reserve.cost_accumulated = 0.003
    reserve.last_request.CopyFrom(timestamp(1_767_225_100, 500_000_000))
    reserve.last_failure.CopyFrom(timestamp(1_767_225_101, 0))
    reserve.deactivation_reason = state_pb2.DEACTIVATION_REASON_ERROR_THRESHOLD

    provider = state.providers["openai"]
    provider.available = True
    provider.auth_valid = True
    provider.last_probe.CopyFrom(timestamp(1_767_225_599, 250_000_000))
    provider.availability_score = 0.5
    provider.active_model_count = 1
    provider.total_quota_used = 4_200
    provider.total_cost = 12.75

    pool = state.pools["chat-default"]
    pool.active_models.extend(["openai/gpt-4o"])
    pool.standby_models.extend(["anthropic/claude-sonnet"])
    pool.rotation_count = 5
    pool.last_rotation.CopyFrom(timestamp(1_767_220_000, 7))
    return state


def compare_messages(expected, actual, path, mismatches):
    """Append a "path: expected X, got Y" entry to mismatches for each differing field."""
    for field in expected.DESCRIPTOR.fields:
        field_path = f"{path}.{field.name}"
        expected_value = getattr(expected, field.name)
        actual_value = getattr(actual, field.name)

        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            compare_maps(field, expected_value, actual_value, field_path, mismatches)
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            if list(expected_value) != list(actual_value):
                mismatches.append(f"{field_path}: expected {list(expected_value)}, got {list(actual_value)}")
        elif field.message_type is not None or field.has_presence:
            expected_set = expected.HasField(field.name)
            actual_set = actual.HasField(field.name)
            if expected_set != actual_set:
                mismatches.append(f"{field_path}: expected set={expected_set}, got set={actual_set}")
            elif expected_set and field.message_type is not None:
                compare_messages(expected_value, actual_value, field_path, mismatches)
            elif expected_set and expected_value != actual_value:
                mismatches.append(f"{field_path}: expected {expected_value!r}, got {actual_value!r}")
        elif expected_value != actual_value:
            mismatches.append(f"{field_path}: expected {expected_value!r}, got {actual_value!r}")


def compare_maps(field, expected_map, actual_map, path, mismatches):
    missing = sorted(set(expected_map) - set(actual_map))
    unexpected = sorted(set(actual_map) - set(expected_map))
    if missing:
        mismatches.append(f"{path}: missing keys {missing}")
    if unexpected:
        mismatches.append(f"{path}: unexpected keys {unexpected}")
    value_field = field.message_type.fields_by_name["value"]
    for key in sorted(set(expected_map) & set(actual_map)):
        key_path = f"{path}[{key!r}]"
        if value_field.message_type is not None:
            compare_messages(expected_map[key], actual_map[key], key_path, mismatches)
        elif expected_map[key] != actual_map[key]:
            mismatches.append(f"{key_path}: expected {expected_map[key]!r}, got {actual_map[key]!r}")


def check_sync_status(status, where):
    """Raise CheckFailed unless status shows an immediate-policy etcd daemon with nothing pending."""
    problems = []
    if status.policy != state_pb2.SYNC_POLICY_IMMEDIATE:
        problems.append(f"policy {state_pb2.SyncPolicy.Name(status.policy)}, expected SYNC_POLICY_IMMEDIATE")
    if status.connector != EXPECTED_CONNECTOR:
        problems.append(f"connector {status.connector!r}, expected {EXPECTED_CONNECTOR!r}")
    if status.pending_changes != 0:
        problems.append(f"pending_changes {status.pending_changes}, expected 0 under the immediate policy")
    if not status.HasField("last_sync"):
        problems.append("last_sync is unset, expected the time of the last write or load")
    if problems:
        raise CheckFailed(f"{where} returned an unexpected sync status: " + "; ".join(problems))


def describe_sync_status(status):
    return {
        "policy": state_pb2.SyncPolicy.Name(status.policy),
        "connector": status.connector,
        "pending_changes": status.pending_changes,
        "last_sync_set": status.HasField("last_sync"),
        "next_sync_set": status.HasField("next_sync"),
        "locked": status.locked,
    }


def next_status_until(stream, condition, what):
    """Read WatchSyncStatus responses until one satisfies condition; raise CheckFailed if the stream ends first."""
    for response in stream:
        if condition(response.status):
            return response.status
    raise CheckFailed(f"WatchSyncStatus ended before {what}")


def exercise_lock_and_stream(stub, expected):
    """Take the state lock, save under its fence, release it, and follow both on the status stream.

    Returns a summary for the JSON result. The fenced save writes the expected
    state again, so a later --verify-only run still finds it.
    """
    stream = stub.WatchSyncStatus(service_pb2.WatchSyncStatusRequest(), timeout=CALL_TIMEOUT_SECONDS)
    try:
        next_status_until(stream, lambda status: not status.locked, "the first status")

        acquired = stub.AcquireLock(
            lock_pb2.AcquireLockRequest(owner="python-router"), timeout=CALL_TIMEOUT_SECONDS
        ).lock
        locked = next_status_until(stream, lambda status: status.locked, "the lock was shown as taken")
        if locked.lock_owner != "python-router":
            raise CheckFailed(f"the status stream shows lock owner {locked.lock_owner!r}, expected 'python-router'")

        fence = lock_pb2.Fence(token=acquired.fencing_token)
        stub.Save(service_pb2.SaveRequest(state=expected, fence=fence), timeout=CALL_TIMEOUT_SECONDS)
        stub.ReleaseLock(lock_pb2.ReleaseLockRequest(lock=acquired), timeout=CALL_TIMEOUT_SECONDS)
        next_status_until(stream, lambda status: not status.locked, "the lock was shown as released")

        # The grant has ended, so its fence no longer admits a write.
        try:
            stub.Save(service_pb2.SaveRequest(state=expected, fence=fence), timeout=CALL_TIMEOUT_SECONDS)
            raise CheckFailed("Save with the fence of a released lock succeeded, expected FAILED_PRECONDITION")
        except grpc.RpcError as error:
            stale_fence_code = error.code().name
    finally:
        stream.cancel()

    return {
        "owner": acquired.owner,
        "name": acquired.name,
        "fencing_token": str(acquired.fencing_token),
        "stream_showed_taken_and_released": True,
        "stale_fence_code": stale_fence_code,
    }


def exercise_updates_and_watch(stub):
    """Add tokens through UpdateState, retry with the same idempotency key, and follow it on WatchState."""
    stream = stub.WatchState(
        service_pb2.WatchStateRequest(kinds=[changes_pb2.ENTITY_KIND_MODEL], ids=["python/counter"]),
        timeout=CALL_TIMEOUT_SECONDS,
    )
    try:
        first = next(stream)
        if not first.HasField("snapshot") or not first.snapshot.last:
            raise CheckFailed("WatchState did not start with a one-message snapshot of an unknown model")

        change = changes_pb2.ModelChange(id="python/counter", add=changes_pb2.ModelCounters(tokens_used=LARGE_TOKEN_COUNT))
        request = service_pb2.UpdateStateRequest(models=[change], idempotency_key="python-request-1")
        applied = stub.UpdateState(request, timeout=CALL_TIMEOUT_SECONDS)
        retried = stub.UpdateState(request, timeout=CALL_TIMEOUT_SECONDS)
        if applied.replayed or not retried.replayed or retried.revision != applied.revision:
            raise CheckFailed("a retried idempotency key was not answered as a replay of the first request")

        for message in stream:
            if any(entry.id == "python/counter" for entry in message.changes):
                watched = message
                break
        else:
            raise CheckFailed("WatchState ended before the update arrived")
    finally:
        stream.cancel()

    loaded = stub.Load(service_pb2.LoadRequest(), timeout=CALL_TIMEOUT_SECONDS)
    # Removing the counter leaves the saved state as it was, for the --verify-only run after a restart.
    removal = changes_pb2.ModelChange(id="python/counter", remove=True)
    stub.UpdateState(service_pb2.UpdateStateRequest(models=[removal]), timeout=CALL_TIMEOUT_SECONDS)
    return {
        "tokens_after_retry": str(loaded.state.models["python/counter"].tokens_used),
        "update_revision": str(applied.revision),
        "watched_revision": str(watched.revision),
        "watched_tokens": str(watched.changes[0].model.tokens_used),
    }


def run_large(address, model_count):
    """Save MODEL_COUNT models, then read them with gRPC's default 4 MiB receive limit."""
    state = state_pb2.SystemState()
    for index in range(model_count):
        model = state.models[f"provider-family/model-name-{index:06d}"]
        model.status = state_pb2.MODEL_STATUS_ACTIVE
        model.tokens_used = LARGE_TOKEN_COUNT + index
        model.quota_used = index
        model.error_rate = 0.25
        model.cost_accumulated = index * 0.5
        model.last_request.CopyFrom(timestamp(1_767_225_600 + index, 500_000_000))
    result = {"mode": "large", "request_bytes": state.ByteSize()}

    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.StateManagerServiceStub(channel)
        stub.Save(service_pb2.SaveRequest(state=state), timeout=120)
        try:
            stub.Load(service_pb2.LoadRequest(), timeout=60)
            result["unary_load"] = "OK"
        except grpc.RpcError as error:
            result["unary_load"] = error.code().name

        merged = state_pb2.SystemState()
        parts = 0
        for response in stub.LoadStream(service_pb2.LoadStreamRequest(), timeout=120):
            merged.MergeFrom(response.part)
            parts += 1
        result["stream_parts"] = parts
        result["stream_models"] = len(merged.models)
        result["stream_equal"] = merged == state
    return result


def run(address, verify_only):
    expected = build_expected_state()
    result = {"address": address, "mode": "verify-only" if verify_only else "save-and-load"}

    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.StateManagerServiceStub(channel)

        if not verify_only:
            # A new etcd prefix contains no state, so the first Load returns none.
            initial = stub.Load(service_pb2.LoadRequest(), timeout=CALL_TIMEOUT_SECONDS)
            result["initial_state_present"] = initial.HasField("state")
            if initial.HasField("state"):
                raise CheckFailed("Load before the first Save returned a state, expected none on a new etcd prefix")

            saved = stub.Save(service_pb2.SaveRequest(state=expected), timeout=CALL_TIMEOUT_SECONDS)
            check_sync_status(saved.status, "Save")
            result["save_status"] = describe_sync_status(saved.status)

        loaded = stub.Load(service_pb2.LoadRequest(), timeout=CALL_TIMEOUT_SECONDS)
        if not loaded.HasField("state"):
            raise CheckFailed("Load returned no state after the state was saved")
        mismatches = []
        compare_messages(expected, loaded.state, "state", mismatches)
        if mismatches:
            raise CheckFailed("the loaded state differs from the saved one:\n  " + "\n  ".join(mismatches))
        # Whole-message equality guards against a field that the walk above skipped.
        if loaded.state != expected:
            raise CheckFailed("the loaded state differs from the saved one in a field that the comparison missed")

        if not verify_only:
            result["lock"] = exercise_lock_and_stream(stub, expected)
            result["updates"] = exercise_updates_and_watch(stub)

        status = stub.GetSyncStatus(service_pb2.GetSyncStatusRequest(), timeout=CALL_TIMEOUT_SECONDS)
        check_sync_status(status.status, "GetSyncStatus")

    # int64 values go out as strings, because JSON readers such as JavaScript's
    # JSON.parse round integers above 2**53.
    result["models"] = sorted(loaded.state.models)
    result["providers"] = sorted(loaded.state.providers)
    result["pools"] = sorted(loaded.state.pools)
    result["tokens_used"] = {model_id: str(model.tokens_used) for model_id, model in loaded.state.models.items()}
    result["timestamp"] = {"seconds": str(loaded.state.timestamp.seconds), "nanos": loaded.state.timestamp.nanos}
    result["fields_compared"] = "all"
    result["sync_status"] = describe_sync_status(status.status)
    return result


def main(argv):
    arguments = argv[1:]
    verify_only = "--verify-only" in arguments
    large = "--large" in arguments
    positional = [argument for argument in arguments if argument not in ("--verify-only", "--large")]
    if len(positional) != 1 or positional[0].startswith("-"):
        print("usage: state_client.py ADDRESS [--verify-only | --large]", file=sys.stderr)
        return 2

    address = positional[0]
    try:
        result = run_large(address, 50_000) if large else run(address, verify_only)
    except CheckFailed as error:
        print(f"state_client: check failed: {error}", file=sys.stderr)
        return 1
    except grpc.RpcError as error:
        print(f"state_client: call to {address} failed: {error.code().name}: {error.details()}", file=sys.stderr)
        return 2

    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
