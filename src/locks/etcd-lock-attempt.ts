import type { Logger } from "pino";
import { unavailable, type ServiceError } from "../server/service-error.js";
import type { EtcdLockStore, GrantedLease, QueueEntryValue } from "./etcd-lock-store.js";
import { acquireTimedOut, serviceClosing } from "./lock-errors.js";
import type { AcquireOptions, LockDescription, LockGrant } from "./lock-service.js";

/**
 * Steps of one acquire. Every step before `held` may move to `abandoning`,
 * which revokes the lease and so deletes the queue key, leaving nothing
 * behind.
 */
type AttemptState = "granting-lease" | "enqueueing" | "waiting" | "marking" | "held" | "abandoning" | "ended";

const allowedTransitions: Readonly<Record<AttemptState, readonly AttemptState[]>> = {
  "granting-lease": ["enqueueing", "abandoning"],
  enqueueing: ["waiting", "abandoning"],
  waiting: ["marking", "abandoning"],
  marking: ["held", "abandoning"],
  held: [],
  abandoning: ["ended"],
  ended: [],
};

/** Reason an attempt stopped before it got the lock. */
export type StopReason =
  | { kind: "timeout" }
  | { kind: "cancelled" }
  | { kind: "closing" }
  | { kind: "failed"; error: unknown };

/** Services that an attempt uses from its lock service. */
export interface AttemptContext {
  store: EtcdLockStore;
  logger: Logger;
  retryIntervalMs: number;
  /** Passes a ServiceError through, and logs an etcd client error and turns it into UNAVAILABLE naming `action`. */
  toServiceError(error: unknown, action: string): ServiceError;
  /** Reads the current holder, for the message of a timed-out acquire. */
  readHolder(name: string): Promise<LockDescription["holder"]>;
}

/** Shortest time between keepalives of a waiting entry's lease, in milliseconds. */
const minKeepAliveIntervalMs = 250;

/**
 * One acquire of an etcd lock: it queues a key on a fresh lease, waits until
 * no key with a lower create revision is left, and then hands the lease to
 * the caller as the grant. While it waits, the attempt keeps its lease alive
 * itself, because the caller learns the lock id only with the grant. If the
 * daemon dies, the keepalives stop and etcd deletes the key after the TTL.
 * After the grant, only the caller's refreshes keep the lease alive.
 */
export class EtcdLockAttempt {
  private state: AttemptState = "granting-lease";
  private readonly stop = new AbortController();
  private readonly startedAt = Date.now();
  private lease: GrantedLease | undefined;
  private entryKey: Buffer | undefined;
  private token = 0n;
  private keepAliveTimer: NodeJS.Timeout | undefined;
  private timeoutTimer: NodeJS.Timeout | undefined;
  /** Whether the last wait ended with a watch error; a second one in a row waits for the retry timer. */
  private lastWatchFailed = false;

  constructor(
    private readonly context: AttemptContext,
    private readonly options: AcquireOptions,
  ) {}

  /** Ends the attempt before its grant; the first reason wins. */
  abandon(reason: StopReason): void {
    if (!this.stop.signal.aborted) this.stop.abort(reason);
  }

  /** Runs the attempt to its grant, or revokes its lease and throws. */
  async run(): Promise<LockGrant> {
    const { signal } = this.options;
    const onCallerAbort = (): void => this.abandon({ kind: "cancelled" });
    signal.addEventListener("abort", onCallerAbort, { once: true });
    try {
      if (signal.aborted) this.abandon({ kind: "cancelled" });
      return await this.queueAndWait();
    } catch (error) {
      this.transition("abandoning");
      this.clearTimers();
      await this.revokeQuietly();
      this.transition("ended");
      throw await this.failureOf(error);
    } finally {
      signal.removeEventListener("abort", onCallerAbort);
      this.clearTimers();
    }
  }

  private async queueAndWait(): Promise<LockGrant> {
    const { store } = this.context;
    const { name, owner } = this.options;
    const requestedAt = new Date(this.startedAt).toISOString();

    this.throwIfStopped();
    // NOTE: a grant that times out after etcd applied it leaves a lease this attempt never learns of.
    // No key is attached to it, and etcd removes it after its TTL.
    this.lease = await store.grantLease(Math.ceil(this.options.ttlMs / 1000));
    this.throwIfStopped();

    this.transition("enqueueing");
    const key = store.entryKey(name, this.lease.lockId);
    this.entryKey = key;
    this.token = await store.createEntry(key, this.lease, { owner, requestedAt });
    this.throwIfStopped();

    this.transition("waiting");
    this.startKeepAlive(this.lease);
    await this.waitForTurn(key);
    this.clearTimers();
    this.throwIfStopped();

    this.transition("marking");
    const acquiredAt = new Date();
    const value: QueueEntryValue = { owner, requestedAt, acquiredAt: acquiredAt.toISOString() };
    if (!(await store.updateEntry(key, this.token, this.lease.leaseId, value))) throw this.entryLost();
    // The keepalive restarts the TTL, so the caller gets its full ttl from the grant on.
    const keepAliveSentAt = Date.now();
    const ttlSeconds = await store.keepAliveOnce(this.lease.leaseId);
    if (ttlSeconds <= 0) throw this.entryLost();
    this.throwIfStopped();

    this.transition("held");
    const grant: LockGrant = {
      name,
      lockId: this.lease.lockId,
      owner,
      acquiredAt,
      expiresAt: new Date(keepAliveSentAt + ttlSeconds * 1000),
      fencingToken: this.token,
    };
    this.context.logger.info(
      { lock: name, owner, lockId: grant.lockId, fencingToken: grant.fencingToken, waitMs: Date.now() - this.startedAt, ttlSeconds },
      "lock granted",
    );
    return grant;
  }

  /**
   * Waits until no key with a lower create revision is left. It watches only
   * the key just ahead, as etcd's Go `concurrency.Mutex` does, so a release
   * wakes one waiter instead of all. When that key goes, an older key may
   * still hold the lock, so the position is read again.
   */
  private async waitForTurn(key: Buffer): Promise<void> {
    for (;;) {
      const position = await this.context.store.readPosition(this.options.name, key, this.token);
      this.throwIfStopped();
      if (position.kind === "gone") throw this.entryLost();
      if (position.kind === "first") return;
      this.armTimeout();
      this.throwIfStopped();
      await this.waitForDeletion(position.predecessorKey, position.revision + 1n);
    }
  }

  /**
   * Resolves when `predecessorKey` is deleted or when the watch reconnects
   * or fails. It also resolves after `retryIntervalMs`, as a safety net for a
   * watch that stalls. It rejects when the attempt stops.
   */
  private waitForDeletion(predecessorKey: Buffer, startRevision: bigint): Promise<void> {
    const { store, logger, retryIntervalMs } = this.context;
    const stopSignal = this.stop.signal;
    return new Promise<void>((resolve, reject) => {
      const watcher = store.watchDelete(predecessorKey, startRevision);
      let settled = false;
      const finish = (outcome: "deleted" | "reconnected" | "watch-failed" | "retry" | "stopped"): void => {
        if (settled) return;
        settled = true;
        clearTimeout(retryTimer);
        stopSignal.removeEventListener("abort", onStop);
        watcher.cancel().catch((error: unknown) => logger.debug({ err: error }, "cannot cancel a queue watch"));
        this.lastWatchFailed = outcome === "watch-failed";
        if (outcome === "stopped") reject(stopSignal.reason);
        else resolve();
      };
      const onStop = (): void => finish("stopped");
      const retryTimer = setTimeout(() => finish("retry"), retryIntervalMs);
      stopSignal.addEventListener("abort", onStop, { once: true });
      watcher.on("delete", () => finish("deleted"));
      // After a reconnect, etcd3 resumes the watch from the last revision it received. Compaction
      // drops a key's tombstone at the compaction revision (keyIndex.compact in etcd's mvcc package),
      // so after a compaction at the deletion's revision the resumed watch starts without error and
      // never reports the deletion. A read of the position covers that case.
      let connections = 0;
      watcher.on("connected", () => {
        if (connections++ > 0) finish("reconnected");
      });
      // etcd3 1.1.2 emits "error" once when etcd cancels the watch (after a compaction, for one)
      // and then drops the watcher for good, so the position is read again and a new watch made.
      watcher.on("error", (error) => {
        logger.debug({ err: error, lock: this.options.name }, "queue watch failed, reading the queue again");
        if (!this.lastWatchFailed) finish("watch-failed");
      });
    });
  }

  /** Starts the timeout when the attempt first has to wait, so a free lock is granted even with a zero timeout. */
  private armTimeout(): void {
    if (this.timeoutTimer !== undefined) return;
    const remainingMs = this.startedAt + this.options.timeoutMs - Date.now();
    if (remainingMs <= 0) {
      this.abandon({ kind: "timeout" });
      return;
    }
    this.timeoutTimer = setTimeout(() => this.abandon({ kind: "timeout" }), remainingMs);
  }

  private startKeepAlive(lease: GrantedLease): void {
    const intervalMs = Math.max(minKeepAliveIntervalMs, (lease.ttlSeconds * 1000) / 3);
    this.keepAliveTimer = setInterval(() => {
      this.context.store.keepAliveOnce(lease.leaseId).then(
        (ttlSeconds) => {
          if (ttlSeconds <= 0) this.abandon({ kind: "failed", error: this.entryLost() });
        },
        (error: unknown) => this.abandon({ kind: "failed", error }),
      );
    }, intervalMs);
  }

  private clearTimers(): void {
    clearInterval(this.keepAliveTimer);
    clearTimeout(this.timeoutTimer);
    this.keepAliveTimer = undefined;
  }

  private async revokeQuietly(): Promise<void> {
    if (this.lease === undefined) return;
    try {
      await this.context.store.revokeLease(this.lease.leaseId);
    } catch (error) {
      this.context.logger.warn(
        { err: error, lock: this.options.name, lockId: this.lease.lockId, ttlSeconds: this.lease.ttlSeconds },
        "cannot revoke the lease of an abandoned lock request; etcd deletes its queue key when the lease expires",
      );
    }
  }

  /** Returns the error that `run` throws, chosen by why the attempt stopped. */
  private async failureOf(error: unknown): Promise<unknown> {
    const { name } = this.options;
    const { logger } = this.context;
    const reason = this.stop.signal.aborted ? (this.stop.signal.reason as StopReason) : { kind: "failed" as const, error };
    switch (reason.kind) {
      case "timeout": {
        const holder = await this.context.readHolder(name).catch(() => undefined);
        logger.info(
          { lock: name, owner: this.options.owner, timeoutMs: this.options.timeoutMs, holder: holder?.owner, fencingToken: holder?.fencingToken },
          "lock request timed out",
        );
        return acquireTimedOut(name, this.options.timeoutMs, holder);
      }
      case "cancelled":
        logger.info({ lock: name, owner: this.options.owner, waitMs: Date.now() - this.startedAt }, "lock request cancelled");
        return this.options.signal.reason;
      case "closing":
        return serviceClosing(name);
      case "failed":
        return this.context.toServiceError(reason.error, `acquire lock "${name}"`);
    }
  }

  private entryLost(): ServiceError {
    return unavailable(
      `cannot acquire lock "${this.options.name}": its queue key "${this.entryKey?.toString() ?? ""}" was deleted ` +
        `while waiting, because its lease expired or was revoked; acquire the lock again`,
    );
  }

  private throwIfStopped(): void {
    if (this.stop.signal.aborted) throw this.stop.signal.reason;
  }

  private transition(next: AttemptState): void {
    if (next === "abandoning" && (this.state === "abandoning" || this.state === "ended")) return;
    if (!allowedTransitions[this.state].includes(next)) {
      throw new Error(`lock attempt on "${this.options.name}" cannot move from ${this.state} to ${next}`);
    }
    this.state = next;
  }
}
