import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { EntityKind } from "../gen/modelmesh/state/v1/changes_pb.js";
import type { VerifiedFence } from "../locks/lock-service.js";
import type { EntityValue } from "../state/entity.js";

/** A change to one model, provider or pool. */
export interface EntityWrite {
  kind: EntityKind;
  id: string;
  /**
   * Computes the new value from the value stored now (undefined when absent),
   * and returns undefined to delete the entity. The writer calls it again on
   * every commit attempt, each time with a fresh copy of the stored value, so
   * it must have no side effects. A thrown error, such as a ServiceError with
   * FAILED_PRECONDITION, fails only this request.
   */
  compute(stored: EntityValue | undefined): EntityValue | undefined;
}

/** Revision and values of one commit. */
export interface CommitResult {
  /** etcd revision of the transaction that committed the request. */
  revision: bigint;
  /** Value that each write's compute returned, in the order of `writes`; undefined for a deletion. */
  values: (EntityValue | undefined)[];
}

/** Writes that commit together or not at all. */
export interface WriteRequest {
  writes: EntityWrite[];
  /**
   * When set, the committed values are recorded under
   * `{prefix}/idempotency/{SHA-256 hex of the key}` in the same transaction,
   * and a later request with the same key is not applied again: it returns
   * the first request's result as a replay until the record expires.
   */
  idempotencyKey?: string;
  /**
   * Builds the bytes that a replay returns, such as an encoded
   * UpdateStateResponse. A replay calls it with the revision and values of
   * the first commit. It is called only on replays, because the record must
   * be written before the commit revision is known.
   */
  encodeReplay?(result: CommitResult): Uint8Array;
  /**
   * When set, the commit also stores it as SystemState.timestamp in
   * `current`. That write makes the concurrent commits of other writers
   * retry once, so it suits flushed saves rather than every update. When
   * several requests of one group set it, the last one in queue order wins.
   */
  timestamp?: Timestamp;
  /** When set, the request commits only while this lock grant is current, else it fails with FAILED_PRECONDITION. */
  fence?: VerifiedFence;
  /** Aborting it before the request's commit starts rejects the request with `signal.reason`. */
  signal?: AbortSignal;
}

/** Outcome of a request: applied now, or applied earlier under the same idempotency key. */
export type WriteResult =
  | ({ replayed: false } & CommitResult)
  | ({
      replayed: true;
      /** Bytes that `encodeReplay` built from the first commit, or empty bytes without `encodeReplay`. */
      replay: Uint8Array;
    } & CommitResult);
