import { setTimeout as sleep } from "node:timers/promises";
import { create } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import type { Logger } from "pino";
import { syncPolicyName } from "../config/daemon-config.js";
import type { UpdateStateRequest, UpdateStateResponse } from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import { SyncPolicy, SyncStatusSchema, type SyncStatus, type SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import { unavailable } from "../server/service-error.js";
import type { VerifiedFence } from "../locks/lock-service.js";
import type { ConnectorId } from "../storage/storage-connector.js";
import type { ChangeLog } from "./change-log.js";
import { countEntities } from "./entity-events.js";
import type { StateStore } from "./state-store.js";

export interface StateManagerOptions {
  store: StateStore;
  /** Id of the storage connector behind the store, for the status and logs. */
  connectorId: ConnectorId;
  policy: SyncPolicy;
  /** Time between flushes under the periodic policy. */
  syncIntervalMs: number;
  logger: Logger;
}

/** Maximum wait between two attempts to load the state at start. */
const maxLoadRetryDelayMs = 10_000;

/**
 * Decides, by the sync policy, when the daemon's state store writes to
 * storage:
 *
 * - in-memory: never written, so lost on restart.
 * - sync-on-boundary: loaded at start, written at graceful shutdown.
 * - periodic: loaded at start, written every sync interval when changed, and at shutdown.
 * - immediate: loaded at start; a change returns only after storage committed it.
 *
 * Flushes run one at a time. Under the immediate policy the store commits
 * each change itself and groups concurrent ones.
 */
export class StateManager {
  private readonly store: StateStore;
  private readonly connectorId: ConnectorId;
  private readonly policy: SyncPolicy;
  private readonly syncIntervalMs: number;
  private readonly logger: Logger;

  private loaded = false;
  private stopped = false;
  /** Aborted by `shutdown`, which ends the wait between two load attempts. */
  private readonly stopController = new AbortController();
  /** Changes accepted since start; each Save and each UpdateState counts as one. */
  private acceptedChanges = 0;
  /** Value of `acceptedChanges` that the last successful write contained. */
  private persistedChanges = 0;
  private lastSync: Date | undefined;
  private nextSync: Date | undefined;
  private periodicTimer: NodeJS.Timeout | undefined;
  private writeChain: Promise<void> = Promise.resolve();
  private readonly statusListeners = new Set<() => void>();

  constructor(options: StateManagerOptions) {
    this.store = options.store;
    this.connectorId = options.connectorId;
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
    for (let attempt = 1, delayMs = 500; !this.stopped; attempt++, delayMs = Math.min(delayMs * 2, maxLoadRetryDelayMs)) {
      try {
        await this.loadFromConnector();
        return true;
      } catch (error) {
        // The first failure is logged whole; repeats only by message, so a long outage does not flood the log.
        const reason = attempt === 1 ? { err: error } : { error: (error as Error).message };
        this.logger.warn(
          { ...reason, connector: this.connectorId, attempt, retryInMs: delayMs },
          "cannot load state at start; retrying",
        );
        await sleep(delayMs, undefined, { signal: this.stopController.signal }).catch(() => undefined);
      }
    }
    return false;
  }

  /** Returns the state the daemon holds, or undefined when there is none. */
  current(): SystemState | undefined {
    this.assertLoaded();
    return this.store.view();
  }

  /** Committed changes, for WatchState. */
  get changeLog(): ChangeLog {
    this.assertLoaded();
    return this.store.changeLog;
  }

  /** The store, for WatchState snapshots and resumes. */
  get stateStore(): StateStore {
    this.assertLoaded();
    return this.store;
  }

  /**
   * Replaces the whole state. Under the immediate policy it resolves once
   * storage committed it, and a fence is checked atomically with that commit.
   * Under the other policies a fence was checked by the caller.
   */
  async save(state: SystemState, fence?: VerifiedFence): Promise<void> {
    this.assertLoaded();
    const commit = this.policy === SyncPolicy.IMMEDIATE;
    const startedAt = performance.now();
    await this.store.save(state, fence, commit);
    this.countAcceptedChange(commit);
    if (commit) {
      this.logger.info(
        { reason: "save", entities: countEntities(state), durationMs: Math.round(performance.now() - startedAt) },
        "state synced",
      );
    }
  }

  /** Applies a validated UpdateState request, committed first under the immediate policy. */
  async update(request: UpdateStateRequest, fence?: VerifiedFence): Promise<UpdateStateResponse> {
    this.assertLoaded();
    const commit = this.policy === SyncPolicy.IMMEDIATE;
    const response = await this.store.update(request, fence, commit);
    if (!response.replayed) this.countAcceptedChange(commit);
    return response;
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
      connector: this.connectorId,
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
    this.stopController.abort();
    clearInterval(this.periodicTimer);
    this.periodicTimer = undefined;
    this.nextSync = undefined;
    if (this.policy === SyncPolicy.IN_MEMORY || !this.loaded) return true;
    try {
      await this.flush("shutdown");
      return true;
    } catch (error) {
      this.logger.error(
        { err: error, pendingChanges: this.pendingChanges, connector: this.connectorId },
        "cannot write state at shutdown; changes since the last sync are lost",
      );
      return false;
    }
  }

  /** Stops following storage. Call after `shutdown`, which writes what is pending. */
  async close(): Promise<void> {
    await this.store.close();
  }

  private get pendingChanges(): number {
    return this.acceptedChanges - this.persistedChanges;
  }

  private async loadFromConnector(): Promise<void> {
    const startedAt = performance.now();
    const loadPersisted = this.policy !== SyncPolicy.IN_MEMORY;
    await this.store.open(loadPersisted);
    this.loaded = true;
    if (loadPersisted) this.lastSync = new Date();
    const state = this.store.view();
    this.logger.info(
      {
        connector: this.connectorId,
        policy: syncPolicyName(this.policy),
        found: state !== undefined,
        entities: countEntities(state),
        durationMs: Math.round(performance.now() - startedAt),
      },
      loadPersisted ? "state loaded" : "state starts empty under the in-memory policy",
    );
    if (this.policy === SyncPolicy.PERIODIC) this.startPeriodicTimer();
    this.notifyStatus();
  }

  private countAcceptedChange(committed: boolean): void {
    this.acceptedChanges++;
    if (committed) {
      this.persistedChanges = this.acceptedChanges;
      this.lastSync = new Date();
    }
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

  /** Writes the accepted changes if there are any. */
  private async flush(reason: string): Promise<void> {
    await this.enqueueWrite(async () => {
      if (this.pendingChanges === 0) return;
      const changesInWrite = this.acceptedChanges;
      const startedAt = performance.now();
      await this.store.flush();
      this.logger.info(
        {
          reason,
          connector: this.connectorId,
          changes: changesInWrite - this.persistedChanges,
          durationMs: Math.round(performance.now() - startedAt),
        },
        "state synced",
      );
      this.persistedChanges = changesInWrite;
      this.lastSync = new Date();
    });
    this.notifyStatus();
  }

  private enqueueWrite(write: () => Promise<void>): Promise<void> {
    const result = this.writeChain.then(write);
    this.writeChain = result.catch(() => undefined);
    return result;
  }

  private assertLoaded(): void {
    if (!this.loaded) {
      throw unavailable(
        `the state is not loaded from ${this.connectorId} yet; the daemon keeps retrying, so retry the call shortly`,
      );
    }
  }

  private notifyStatus(): void {
    for (const listener of this.statusListeners) listener();
  }
}
