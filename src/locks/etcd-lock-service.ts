import type { Etcd3 } from "etcd3";
import type { Logger } from "pino";
import { isServiceError, unavailable, type ServiceError } from "../server/service-error.js";
import { EtcdHolderWatch } from "./etcd-holder-watch.js";
import { EtcdLockAttempt } from "./etcd-lock-attempt.js";
import { EtcdLockStore, type QueueEntry } from "./etcd-lock-store.js";
import {
  grantEnded,
  grantQueued,
  serviceClosing,
  staleFence,
  validateAcquireOptions,
  validateFencingToken,
  validateLockId,
  validateLockName,
} from "./lock-errors.js";
import type { AcquireOptions, LockDescription, LockGrant, LockService, VerifiedFence } from "./lock-service.js";

/** Settings of `EtcdLockService.open`. */
export interface EtcdLockServiceOptions {
  /** The daemon's etcd client. The lock service uses it and never closes it. */
  client: Etcd3;
  /** Client URLs of the etcd cluster, which error messages name. */
  endpoints: readonly string[];
  /** Key prefix without a trailing slash; the queue of lock NAME lives under `{prefix}/locks/NAME/`. */
  prefix: string;
  /** Deadline of each etcd request, in milliseconds. */
  requestTimeoutMs: number;
  /** Time between re-reads of a lock queue while no watch event arrives, in milliseconds. */
  retryIntervalMs: number;
}

type Holder = LockDescription["holder"];

/** A lock id is the lease id in lowercase hex; etcd lease ids are positive int64 values. */
const lockIdPattern = /^[0-9a-f]{1,16}$/;

/**
 * Locks shared by every daemon on one etcd cluster. Each lock is a queue of
 * keys, one per caller, each attached to the caller's own lease. The key
 * with the lowest create revision owns the lock, and that revision is the
 * fencing token. The daemon does not keep a granted lease alive, so a holder
 * that stops refreshing loses the lock when etcd expires its lease, and the
 * next key in the queue takes over.
 */
export class EtcdLockService implements LockService {
  private readonly store: EtcdLockStore;
  private readonly logger: Logger;
  private readonly endpointList: string;
  private readonly pending = new Map<EtcdLockAttempt, Promise<unknown>>();
  private readonly holderWatches = new Map<string, EtcdHolderWatch>();
  private closing = false;

  private constructor(
    private readonly options: EtcdLockServiceOptions,
    logger: Logger,
  ) {
    this.store = new EtcdLockStore(options.client, options.prefix, options.requestTimeoutMs);
    this.endpointList = options.endpoints.join(",");
    this.logger = logger.child({ component: "locks", backend: "etcd", prefix: options.prefix });
  }

  /** Checks the settings and creates the service; it sends no etcd request until the first call. */
  static async open(options: EtcdLockServiceOptions, logger: Logger): Promise<EtcdLockService> {
    if (options.prefix === "" || options.prefix.endsWith("/")) {
      throw new Error(`cannot open the etcd lock service: the prefix must be non-empty without a trailing "/", got "${options.prefix}"`);
    }
    for (const [field, value] of [
      ["requestTimeoutMs", options.requestTimeoutMs],
      ["retryIntervalMs", options.retryIntervalMs],
    ] as const) {
      if (!Number.isFinite(value) || value <= 0) {
        throw new Error(`cannot open the etcd lock service: ${field} must be a positive number of milliseconds, got ${value}`);
      }
    }
    return new EtcdLockService(options, logger);
  }

  async acquire(options: AcquireOptions): Promise<LockGrant> {
    validateAcquireOptions(options);
    if (this.closing) throw serviceClosing(options.name);
    const attempt = new EtcdLockAttempt(
      {
        store: this.store,
        logger: this.logger,
        retryIntervalMs: this.options.retryIntervalMs,
        toServiceError: (error, action) => this.toServiceError(error, action),
        readHolder: async (name) => (await this.readHolder(name)).holder,
      },
      options,
    );
    const run = attempt.run();
    this.pending.set(attempt, run);
    try {
      return await run;
    } finally {
      this.pending.delete(attempt);
    }
  }

  async release(name: string, lockId: string): Promise<void> {
    this.validateGrantId(name, lockId);
    const key = this.store.entryKey(name, lockId);
    try {
      const entry = await this.store.readEntry(key);
      if (entry === undefined) throw grantEnded("release", name, lockId);
      try {
        await this.store.revokeLease(entry.leaseId);
      } catch (error) {
        // The lease may have expired between the read and the revoke.
        if ((await this.store.readEntry(key)) === undefined) throw grantEnded("release", name, lockId);
        throw error;
      }
      const acquiredAt = parseTime(entry.value?.acquiredAt);
      this.logger.info(
        {
          lock: name,
          owner: entry.value?.owner,
          lockId,
          fencingToken: entry.token,
          heldMs: acquiredAt === undefined ? undefined : Date.now() - acquiredAt.getTime(),
        },
        "lock released",
      );
    } catch (error) {
      throw this.toServiceError(error, `release lock "${name}"`);
    }
  }

  async refresh(name: string, lockId: string): Promise<LockGrant> {
    this.validateGrantId(name, lockId);
    const key = this.store.entryKey(name, lockId);
    try {
      const { entry, head } = await this.store.readEntryAndHead(name, key);
      if (entry === undefined) throw grantEnded("refresh", name, lockId);
      if (head !== undefined && head.token !== entry.token) throw grantQueued(name, lockId);
      const sentAt = Date.now();
      const ttlSeconds = await this.store.keepAliveOnce(entry.leaseId);
      if (ttlSeconds <= 0) throw grantEnded("refresh", name, lockId);
      const grant: LockGrant = {
        name,
        lockId,
        owner: entry.value?.owner ?? "",
        acquiredAt: parseTime(entry.value?.acquiredAt) ?? new Date(sentAt),
        expiresAt: new Date(sentAt + ttlSeconds * 1000),
        fencingToken: entry.token,
      };
      this.logger.debug({ lock: name, lockId, fencingToken: grant.fencingToken, ttlSeconds }, "lock refreshed");
      return grant;
    } catch (error) {
      throw this.toServiceError(error, `refresh lock "${name}"`);
    }
  }

  async describe(name: string): Promise<LockDescription> {
    validateLockName(name);
    try {
      const { holder, count } = await this.readHolder(name);
      return { name, holder, waiters: Math.max(0, count - 1) };
    } catch (error) {
      throw this.toServiceError(error, `describe lock "${name}"`);
    }
  }

  async checkFence(name: string, token: bigint): Promise<VerifiedFence> {
    validateLockName(name);
    validateFencingToken(name, token);
    try {
      const { head } = await this.store.readHead(name);
      if (head?.token !== token) throw staleFence(name, token, head?.token);
      // Keys join the queue with ever higher create revisions, so while the head's key exists nothing
      // can move ahead of it. The connector's commit compares that key's create revision with the
      // token, which makes the fence atomic with the write. So `isCurrent` has nothing to add.
      return { lockName: name, token, etcdKey: head.key.toString("utf8"), isCurrent: () => true };
    } catch (error) {
      throw this.toServiceError(error, `check fencing token ${token} of lock "${name}"`);
    }
  }

  watchHolder(name: string, listener: (holder: Holder) => void): () => void {
    validateLockName(name);
    if (this.closing) return () => {};
    let watch = this.holderWatches.get(name);
    if (watch === undefined) {
      watch = new EtcdHolderWatch(
        {
          store: this.store,
          logger: this.logger,
          retryIntervalMs: this.options.retryIntervalMs,
          readHolder: (lockName) => this.readHolder(lockName),
        },
        name,
      );
      this.holderWatches.set(name, watch);
    }
    const subscribed = watch;
    subscribed.subscribe(listener);
    return () => {
      subscribed.unsubscribe(listener);
      if (subscribed.listenerCount === 0 && this.holderWatches.get(name) === subscribed) {
        subscribed.close();
        this.holderWatches.delete(name);
      }
    };
  }

  async close(): Promise<void> {
    this.closing = true;
    for (const attempt of this.pending.keys()) attempt.abandon({ kind: "closing" });
    // Each attempt revokes its lease before it settles, so no queue key outlives the service.
    await Promise.allSettled(this.pending.values());
    for (const watch of this.holderWatches.values()) watch.close();
    this.holderWatches.clear();
    this.logger.debug("lock service closed");
  }

  /** Reads the holder with its lease's remaining time, and the queue length. */
  private async readHolder(name: string): Promise<{ holder: Holder; count: number; revision: bigint }> {
    const { head, count, revision } = await this.store.readHead(name);
    if (head === undefined) return { holder: undefined, count, revision };
    const ttlSeconds = head.leaseId === "0" ? 0 : await this.store.leaseTimeToLive(head.leaseId);
    return { holder: holderOf(name, head, ttlSeconds, Date.now()), count, revision };
  }

  private validateGrantId(name: string, lockId: string): void {
    validateLockName(name);
    validateLockId(name, lockId, lockIdPattern, "the hex lease id that AcquireLock returned");
  }

  /** Passes deliberate errors through, logs anything else and returns it as UNAVAILABLE naming the endpoints. */
  private toServiceError(error: unknown, action: string): ServiceError {
    if (isServiceError(error)) return error;
    this.logger.warn({ err: error, action }, "etcd request of the lock service failed");
    const reason = error instanceof Error ? error.message : String(error);
    return unavailable(`cannot ${action}: etcd at ${this.endpointList} failed: ${reason}`, error);
  }
}

/**
 * Describes the head of a queue as the holder. Its expiry is exact to the
 * second only, since etcd reports a lease's remaining time in whole seconds,
 * rounded down.
 */
function holderOf(name: string, head: QueueEntry, ttlSeconds: number, readAt: number): NonNullable<Holder> {
  return {
    name,
    // NOTE: a key without a parsable value was not written by this service, but it keeps its place in the queue.
    owner: head.value?.owner ?? "",
    fencingToken: head.token,
    // A head without acquiredAt became the head a moment ago, and its daemon has not recorded the grant yet.
    acquiredAt: parseTime(head.value?.acquiredAt) ?? new Date(readAt),
    expiresAt: new Date(readAt + Math.max(0, ttlSeconds) * 1000),
  };
}

function parseTime(text: string | undefined): Date | undefined {
  if (text === undefined) return undefined;
  const time = new Date(text);
  return Number.isNaN(time.getTime()) ? undefined : time;
}
