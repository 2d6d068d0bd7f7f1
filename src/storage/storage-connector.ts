import type { SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import type { VerifiedFence } from "../locks/lock-service.js";

/** Ids of the storage connectors, as `storage.connector` names them. */
export const ConnectorId = {
  etcd: "modelmesh.etcd.v1",
  localFile: "modelmesh.local-file.v1",
  memory: "modelmesh.memory.v1",
} as const;

export type ConnectorId = (typeof ConnectorId)[keyof typeof ConnectorId];

export interface SaveOptions {
  fence?: VerifiedFence | undefined;
  /** Abandons the save before its commit step; what was staged is removed. */
  signal?: AbortSignal | undefined;
}

/**
 * A backend that stores whole state snapshots.
 *
 * `save` is all or nothing: a reader sees the previous snapshot or the new
 * one, never a mix, also when the process dies half-way. Backend failures are
 * thrown as `ServiceError` with code UNAVAILABLE; snapshots that exceed a
 * backend limit are thrown with RESOURCE_EXHAUSTED.
 */
export interface StorageConnector {
  readonly id: ConnectorId;

  /** Reads the latest committed snapshot, or `undefined` when none was ever saved. */
  load(signal?: AbortSignal): Promise<SystemState | undefined>;

  /**
   * Replaces the stored snapshot with `state`, resolving once it is committed,
   * with the storage revision of the commit where the backend has revisions.
   * With a fence, the commit happens only while the fence's lock grant is
   * current, else it throws FAILED_PRECONDITION and stores nothing.
   */
  save(state: SystemState, options?: SaveOptions): Promise<bigint | void>;

  /** Resolves to true when the backend responds within its probe timeout. */
  isReachable(): Promise<boolean>;

  /** Releases connections and timers. The connector is unusable afterwards. */
  close(): Promise<void>;
}
