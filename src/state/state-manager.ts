import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Logger } from "pino";
import { syncPolicyName } from "../config/daemon-config.js";
import { SyncPolicy, SyncStatusSchema, type SyncStatus, type SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import { unavailable } from "../server/service-error.js";
import type { VerifiedFence } from "../locks/lock-service.js";
import { assertFenceCurrent } from "../storage/assert-fence-current.js";
import type { StorageConnector } from "../storage/storage-connector.js";

export interface StateManagerOptions {
  connector: StorageConnector;
  policy: SyncPolicy;
  /** Time between flushes under the periodic policy. */
  syncIntervalMs: number;
  logger: Logger;
}

/** Longest wait between two attempts to load the state at start. */
const maxLoadRetryDelayMs = 10_000;

/**
 * Holds the daemon's copy of the system state and writes it to the storage
 * connector as the sync policy prescribes:
 *
 * - in-memory: never written, so lost on restart.
 * - sync-on-boundary: loaded at start, written at graceful shutdown.
 * - periodic: loaded at start, written every sync interval when changed, and at shutdown.
 * - immediate: loaded at start; a save returns only after the connector committed it.
 *
 * Writes run one at a time, in the order they were accepted.
 */
export class StateManager {
  private readonly connector: StorageConnector;
  private readonly policy: SyncPolicy;
  private readonly syncIntervalMs: number;
  private readonly logger: Logger;

  private state: SystemState | undefined;
  private loaded = false;
  private stopped = false;
  /** Changes accepted since start; each Save counts as one. */
  private acceptedChanges = 0;
  /** Value of `acceptedChanges` that the last successful write contained. */
  private persistedChanges = 0;
  private lastSync: Date | undefined;
  private nextSync: Date | undefined;
  private periodicTimer: NodeJS.Timeout | undefined;
  private writeChain: Promise<void> = Promise.resolve();
  private readonly statusListeners = new Set<() => void>();

  constructor(options: StateManagerOptions) {
    this.connector = options.connector;
    this.policy = options.policy;
    this.syncIntervalMs = options.syncIntervalMs;
    this.logger = options.logger.child({ component: "state-manager" });
  }

  get isLoaded(): boolean {
    return this.loaded;
  }

  /**
   * Loads the persisted state, retrying with backoff while the backend is
   * unreachable, so the daemon can start before its etcd. Calls that need the
   * state fail with UNAVAILABLE until the load succeeds. Resolves false if
   * `shutdown` came first.
   */
  async start(): Promise<boolean> {
    if (this.policy === SyncPolicy.IN_MEMORY) {
      this.loaded = true;
      this.notifyStatus();
      return true;
    }
    for (let attempt = 1, delayMs = 500; !this.stopped; attempt++, delayMs = Math.min(delayMs * 2, maxLoadRetryDelayMs)) {
      try {
        await this.loadFromConnector();
        return true;
      } catch (error) {
        this.logger.warn(
          { err: error, connector: this.connector.id, attempt, retryInMs: delayMs },
          "cannot load state at start; retrying",
        );
        await new Promise((resolve) => setTimeout(resolve, delayMs));
      }
    }
    return false;
  }

  /** Returns the state the daemon holds, or undefined when there is none. */
  current(): SystemState | undefined {
    this.assertLoaded();
    return this.state;
  }

  /**
   * Replaces the whole state. Under the immediate policy it resolves once the
   * connector committed it, and a fence is checked atomically with that commit.
   * Under the other policies a fence was checked by the caller and is checked
   * again here for in-process locks.
   */
  async save(state: SystemState, fence?: VerifiedFence): Promise<void> {
    this.assertLoaded();
    if (this.policy !== SyncPolicy.IMMEDIATE) {
      assertFenceCurrent(fence);
      this.state = state;
      this.acceptedChanges++;
      this.notifyStatus();
      return;
    }
    // The daemon's copy changes only after the commit, so a failed write leaves no trace.
    await this.enqueueWrite(async () => {
      await this.writeToConnector(state, "save", this.acceptedChanges + 1, fence);
      this.state = state;
      this.acceptedChanges++;
      this.persistedChanges = this.acceptedChanges;
    });
    this.notifyStatus();
  }

  /**
   * Runs one sync cycle. Periodic and immediate policies write pending
   * changes now; in-memory and sync-on-boundary write only at shutdown, so
   * for them this changes nothing.
   */
  async sync(): Promise<void> {
    this.assertLoaded();
    if (this.policy === SyncPolicy.PERIODIC || this.policy === SyncPolicy.IMMEDIATE) {
      await this.flush("sync request");
    }
  }

  status(): SyncStatus {
    return create(SyncStatusSchema, {
      lastSync: this.lastSync === undefined ? undefined : timestampFromDate(this.lastSync),
      nextSync: this.nextSync === undefined ? undefined : timestampFromDate(this.nextSync),
      pendingChanges: BigInt(this.pendingChanges),
      locked: false,
      policy: this.policy,
      connector: this.connector.id,
    });
  }

  /** Calls `listener` after each change of the sync status; returns the function that unsubscribes it. */
  onStatusChange(listener: () => void): () => void {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  /**
   * Stops the periodic timer and, for every policy that persists, writes
   * pending changes. Resolves false when that final write failed, which
   * means the changes since the last sync are lost.
   */
  async shutdown(): Promise<boolean> {
    this.stopped = true;
    clearInterval(this.periodicTimer);
    this.periodicTimer = undefined;
    this.nextSync = undefined;
    if (this.policy === SyncPolicy.IN_MEMORY || !this.loaded) return true;
    try {
      await this.flush("shutdown");
      return true;
    } catch (error) {
      this.logger.error(
        { err: error, pendingChanges: this.pendingChanges, connector: this.connector.id },
        "cannot write state at shutdown; changes since the last sync are lost",
      );
      return false;
    }
  }

  private get pendingChanges(): number {
    return this.acceptedChanges - this.persistedChanges;
  }

  private async loadFromConnector(): Promise<void> {
    const startedAt = performance.now();
    const state = await this.connector.load();
    this.state = state;
    this.loaded = true;
    this.lastSync = new Date();
    this.logger.info(
      {
        connector: this.connector.id,
        policy: syncPolicyName(this.policy),
        found: state !== undefined,
        models: state === undefined ? 0 : Object.keys(state.models).length,
        durationMs: Math.round(performance.now() - startedAt),
      },
      "state loaded",
    );
    if (this.policy === SyncPolicy.PERIODIC) this.startPeriodicTimer();
    this.notifyStatus();
  }

  private startPeriodicTimer(): void {
    this.nextSync = new Date(Date.now() + this.syncIntervalMs);
    this.periodicTimer = setInterval(() => {
      this.nextSync = new Date(Date.now() + this.syncIntervalMs);
      this.flush("periodic").catch((error: unknown) => {
        this.logger.warn(
          { err: error, pendingChanges: this.pendingChanges, retryInMs: this.syncIntervalMs },
          "periodic sync failed; retrying at the next interval",
        );
      });
    }, this.syncIntervalMs);
  }

  /** Writes the current state if it changed since the last write. */
  private async flush(reason: string): Promise<void> {
    await this.enqueueWrite(async () => {
      if (this.pendingChanges === 0 || this.state === undefined) return;
      const changesInWrite = this.acceptedChanges;
      await this.writeToConnector(this.state, reason, changesInWrite);
      this.persistedChanges = changesInWrite;
    });
    this.notifyStatus();
  }

  private async writeToConnector(
    state: SystemState,
    reason: string,
    changesInWrite: number,
    fence?: VerifiedFence,
  ): Promise<void> {
    const startedAt = performance.now();
    await this.connector.save(state, { fence });
    this.lastSync = new Date();
    this.logger.info(
      {
        reason,
        connector: this.connector.id,
        models: Object.keys(state.models).length,
        providers: Object.keys(state.providers).length,
        pools: Object.keys(state.pools).length,
        changes: changesInWrite - this.persistedChanges,
        durationMs: Math.round(performance.now() - startedAt),
      },
      "state synced",
    );
  }

  private enqueueWrite(write: () => Promise<void>): Promise<void> {
    const result = this.writeChain.then(write);
    this.writeChain = result.catch(() => undefined);
    return result;
  }

  private assertLoaded(): void {
    if (!this.loaded) {
      throw unavailable(
        `the state is not loaded from ${this.connector.id} yet; the daemon keeps retrying, so retry the call shortly`,
      );
    }
  }

  private notifyStatus(): void {
    for (const listener of this.statusListeners) listener();
  }
}
