import { CompareResult, CompareTarget, type ICompare, type IRangeResponse, type IRequestOp } from "etcd3";
import type { VerifiedFence } from "../locks/lock-service.js";
import { failedPrecondition, isServiceError, unavailable, type ServiceError } from "../server/service-error.js";

/** Compares a key's mod_revision. etcd compares an absent key as mod_revision 0. */
export function modRevisionEquals(key: Buffer, modRevision: string): ICompare {
  return { key, target: CompareTarget.Mod, result: CompareResult.Equal, mod_revision: modRevision };
}

export function keyExists(key: Buffer): ICompare {
  return { key, target: CompareTarget.Create, result: CompareResult.Greater, create_revision: 0 };
}

export function keyAbsent(key: Buffer): ICompare {
  return { key, target: CompareTarget.Create, result: CompareResult.Equal, create_revision: 0 };
}

/** Compares the lock holder's queue key, whose create revision is the fencing token while the grant lasts. */
export function fenceHeld(fence: VerifiedFence & { etcdKey: string }): ICompare {
  return {
    key: Buffer.from(fence.etcdKey),
    target: CompareTarget.Create,
    result: CompareResult.Equal,
    create_revision: fence.token.toString(),
  };
}

/** Reads a key's revisions without its value. */
export function rangeKeyOnly(key: Buffer): IRequestOp {
  return { request_range: { key, keys_only: true } };
}

export function rangeKey(key: Buffer): IRequestOp {
  return { request_range: { key } };
}

/** Returns the mod_revision of the single key a range read, or "0" when it is absent. */
export function modRevisionOf(response: IRangeResponse | undefined): string {
  return response?.kvs[0]?.mod_revision ?? "0";
}

/** Returns whether a range of a fence's key shows the grant still current. */
export function isFenceCurrent(response: IRangeResponse | undefined, fence: VerifiedFence): boolean {
  return response?.kvs[0]?.create_revision === fence.token.toString();
}

export function fenceEndedError(fence: VerifiedFence): ServiceError {
  return failedPrecondition(
    `cannot update state with fencing token ${fence.token}: lock "${fence.lockName}" was released or expired before the commit`,
  );
}

/** Returns the number of key and value bytes that a transaction's operations carry. */
export function operationBytes(compare: ICompare[], operations: IRequestOp[]): number {
  let bytes = 0;
  for (const entry of compare) bytes += entry.key?.length ?? 0;
  for (const operation of operations) {
    bytes += operation.request_put?.key?.length ?? 0;
    bytes += operation.request_put?.value?.length ?? 0;
    bytes += operation.request_range?.key?.length ?? 0;
    bytes += operation.request_range?.range_end?.length ?? 0;
    bytes += operation.request_delete_range?.key?.length ?? 0;
    bytes += operation.request_delete_range?.range_end?.length ?? 0;
  }
  return bytes;
}

/** Passes deliberate errors through and turns etcd client errors into UNAVAILABLE. */
export function toServiceError(error: unknown, context: string): ServiceError {
  if (isServiceError(error)) return error;
  const reason = error instanceof Error ? error.message : String(error);
  return unavailable(`${context}: ${reason}`, error);
}

const firstBackoffMs = 2;
const maxBackoffMs = 100;

/**
 * Waits a random time up to an exponential bound before attempt `attempt`
 * retries a conflicting commit, so writers that keep colliding spread out.
 */
export async function backoff(attempt: number): Promise<void> {
  const boundMs = Math.min(maxBackoffMs, firstBackoffMs * 2 ** Math.max(0, attempt - 1));
  await new Promise((resolve) => setTimeout(resolve, Math.random() * boundMs));
}
