import type { UpdateStateRequest, UpdateStateResponse } from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import type { SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import type { VerifiedFence } from "../locks/lock-service.js";
import type { ChangeLog } from "./change-log.js";

/**
 * The storage side of the daemon's state: where the state is kept and how
 * changes reach storage. The state manager decides when, by its sync policy,
 * and a store decides how. With `commit` set, a change resolves only once
 * storage has committed it. Without it, the change is accepted into the
 * daemon's view and written by a later `flush`.
 */
export interface StateStore {
  /** Committed changes, for WatchState. Valid after `open`. */
  readonly changeLog: ChangeLog;

  /** Reads the persisted state when `loadPersisted` is set, and starts following storage where it can change. */
  open(loadPersisted: boolean): Promise<void>;

  /** The daemon's view, including accepted changes not yet written; undefined when there is no state. */
  view(): SystemState | undefined;

  /** The committed state and its revision, from which a WatchState snapshot starts. */
  committed(): { state: SystemState | undefined; revision: bigint };

  /** Replaces the whole state. */
  save(state: SystemState, fence: VerifiedFence | undefined, commit: boolean): Promise<void>;

  /** Applies a validated UpdateState request atomically. */
  update(request: UpdateStateRequest, fence: VerifiedFence | undefined, commit: boolean): Promise<UpdateStateResponse>;

  /** Writes the accepted changes that are not written yet. */
  flush(): Promise<void>;

  /**
   * Tells whether a watch can resume after `revision` with no gap. Waits
   * briefly for a revision that another daemon produced and this one has not
   * seen yet.
   */
  isResumable(revision: bigint, signal: AbortSignal): Promise<boolean>;

  close(): Promise<void>;
}
