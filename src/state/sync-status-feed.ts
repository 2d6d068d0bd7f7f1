import type { SyncStatus } from "../gen/modelmesh/state/v1/state_pb.js";
import type { LockDescription } from "../locks/lock-service.js";
import type { StateManager } from "./state-manager.js";

/**
 * Combines what SyncStatus reports: the state manager's sync progress, the
 * holder of the "state" lock as the lock backend shows it, and whether the
 * storage backend responds. Subscribers learn only that something changed and
 * read the latest status themselves, so a slow one never builds a queue.
 */
export class SyncStatusFeed {
  private readonly manager: StateManager;
  private readonly listeners = new Set<() => void>();
  private lockHolder: LockDescription["holder"];
  private backendReachable = false;

  constructor(manager: StateManager) {
    this.manager = manager;
    manager.onStatusChange(() => this.notify());
  }

  current(): SyncStatus {
    const status = this.manager.status();
    status.locked = this.lockHolder !== undefined;
    status.lockOwner = this.lockHolder?.owner;
    status.backendReachable = this.backendReachable;
    return status;
  }

  get subscriberCount(): number {
    return this.listeners.size;
  }

  /** Calls `listener` after each change; returns the function that unsubscribes it. */
  subscribe(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  setLockHolder(holder: LockDescription["holder"]): void {
    if (holder?.fencingToken === this.lockHolder?.fencingToken && holder?.owner === this.lockHolder?.owner) return;
    this.lockHolder = holder;
    this.notify();
  }

  setBackendReachable(reachable: boolean): void {
    if (reachable === this.backendReachable) return;
    this.backendReachable = reachable;
    this.notify();
  }

  private notify(): void {
    for (const listener of this.listeners) listener();
  }
}
