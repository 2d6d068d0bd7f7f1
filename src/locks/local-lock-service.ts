import { randomBytes } from "node:crypto";
import type { Logger } from "pino";
import {
  acquireTimedOut,
  grantEnded,
  serviceClosing,
  staleFence,
  validateAcquireOptions,
  validateFencingToken,
  validateLockName,
} from "./lock-errors.js";
import type { AcquireOptions, LockDescription, LockGrant, LockService, VerifiedFence } from "./lock-service.js";

type Holder = LockDescription["holder"];
type HolderListener = (holder: Holder) => void;

/** A granted lock and the timer that ends it unless it is refreshed. */
interface HeldGrant {
  grant: LockGrant;
  ttlMs: number;
  expiryTimer: NodeJS.Timeout;
}

/** A caller waiting in a queue, with what ends its wait. */
interface Waiter {
  options: AcquireOptions;
  requestedAt: number;
  resolve(grant: LockGrant): void;
  reject(error: unknown): void;
  timeoutTimer: NodeJS.Timeout;
  onAbort(): void;
}

/** The queue of one lock. While `waiters` is non-empty, `holder` is set. */
interface LockQueue {
  holder: HeldGrant | undefined;
  waiters: Waiter[];
}

// Shared by every LocalLockService in the process, so a token is never handed out twice, also after
// a service is closed and another opened. Tokens restart at 1 in a new process, which is why the
// in-process locks go only with the local-file and memory connectors, whose state other processes never write.
let lastFencingToken = 0n;

function nextFencingToken(): bigint {
  lastFencingToken += 1n;
  return lastFencingToken;
}

/**
 * Locks within one daemon process, for the local-file and memory connectors:
 * a first-come, first-served queue per lock name, a timer per grant that
 * ends it after its ttl unless refreshed, and fencing tokens from a counter
 * that only grows.
 */
export class LocalLockService implements LockService {
  private readonly queues = new Map<string, LockQueue>();
  private readonly listeners = new Map<string, Set<HolderListener>>();
  private readonly logger: Logger;
  private closed = false;

  constructor(logger: Logger) {
    this.logger = logger.child({ component: "locks", backend: "local" });
  }

  async acquire(options: AcquireOptions): Promise<LockGrant> {
    validateAcquireOptions(options);
    if (this.closed) throw serviceClosing(options.name);
    options.signal.throwIfAborted();

    const queue = this.queueOf(options.name);
    const requestedAt = Date.now();
    if (queue.holder === undefined) return this.grant(options, queue, requestedAt);
    // A zero timeout requests the lock only if it is free now.
    if (options.timeoutMs === 0) throw this.timedOut(options, queue);

    return await new Promise<LockGrant>((resolve, reject) => {
      const waiter: Waiter = {
        options,
        requestedAt,
        resolve,
        reject,
        timeoutTimer: setTimeout(() => this.endWait(queue, waiter, this.timedOut(options, queue)), options.timeoutMs),
        onAbort: () => this.endWait(queue, waiter, options.signal.reason),
      };
      options.signal.addEventListener("abort", waiter.onAbort, { once: true });
      queue.waiters.push(waiter);
    });
  }

  async release(name: string, lockId: string): Promise<void> {
    validateLockName(name);
    const queue = this.queues.get(name);
    const held = queue?.holder;
    if (queue === undefined || held === undefined || held.grant.lockId !== lockId) throw grantEnded("release", name, lockId);
    this.logger.info(
      { lock: name, owner: held.grant.owner, lockId, fencingToken: held.grant.fencingToken, heldMs: Date.now() - held.grant.acquiredAt.getTime() },
      "lock released",
    );
    this.endGrant(name, queue);
  }

  async refresh(name: string, lockId: string): Promise<LockGrant> {
    validateLockName(name);
    const queue = this.queues.get(name);
    const held = queue?.holder;
    // Waiters get their lock id only with the grant, so an unknown id was released or expired.
    if (queue === undefined || held === undefined || held.grant.lockId !== lockId) throw grantEnded("refresh", name, lockId);
    clearTimeout(held.expiryTimer);
    held.grant = { ...held.grant, expiresAt: new Date(Date.now() + held.ttlMs) };
    held.expiryTimer = this.startExpiryTimer(name, queue, held.ttlMs);
    this.logger.debug({ lock: name, lockId, fencingToken: held.grant.fencingToken }, "lock refreshed");
    return { ...held.grant };
  }

  async describe(name: string): Promise<LockDescription> {
    validateLockName(name);
    const queue = this.queues.get(name);
    return { name, holder: this.holderOf(queue), waiters: queue?.waiters.length ?? 0 };
  }

  async checkFence(name: string, token: bigint): Promise<VerifiedFence> {
    validateLockName(name);
    validateFencingToken(name, token);
    const currentToken = this.queues.get(name)?.holder?.grant.fencingToken;
    if (currentToken !== token) throw staleFence(name, token, currentToken);
    return {
      lockName: name,
      token,
      isCurrent: () => this.queues.get(name)?.holder?.grant.fencingToken === token,
    };
  }

  watchHolder(name: string, listener: HolderListener): () => void {
    validateLockName(name);
    if (this.closed) return () => {};
    let listeners = this.listeners.get(name);
    if (listeners === undefined) {
      listeners = new Set();
      this.listeners.set(name, listeners);
    }
    const subscribed = listeners;
    subscribed.add(listener);
    // Deferred, so the listener never runs before this method has returned its unsubscribe function.
    queueMicrotask(() => {
      if (subscribed.has(listener)) this.callListener(name, listener, this.holderOf(this.queues.get(name)));
    });
    return () => {
      subscribed.delete(listener);
      if (subscribed.size === 0 && this.listeners.get(name) === subscribed) this.listeners.delete(name);
    };
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const [name, queue] of this.queues) {
      for (const waiter of [...queue.waiters]) this.endWait(queue, waiter, serviceClosing(name));
      if (queue.holder !== undefined) clearTimeout(queue.holder.expiryTimer);
    }
    this.queues.clear();
    this.listeners.clear();
  }

  private queueOf(name: string): LockQueue {
    let queue = this.queues.get(name);
    if (queue === undefined) {
      queue = { holder: undefined, waiters: [] };
      this.queues.set(name, queue);
    }
    return queue;
  }

  private grant(options: AcquireOptions, queue: LockQueue, requestedAt: number): LockGrant {
    const acquiredAt = new Date();
    const grant: LockGrant = {
      name: options.name,
      lockId: randomBytes(8).toString("hex"),
      owner: options.owner,
      acquiredAt,
      expiresAt: new Date(acquiredAt.getTime() + options.ttlMs),
      fencingToken: nextFencingToken(),
    };
    queue.holder = { grant, ttlMs: options.ttlMs, expiryTimer: this.startExpiryTimer(options.name, queue, options.ttlMs) };
    this.logger.info(
      {
        lock: grant.name,
        owner: grant.owner,
        lockId: grant.lockId,
        fencingToken: grant.fencingToken,
        waitMs: acquiredAt.getTime() - requestedAt,
        ttlMs: options.ttlMs,
      },
      "lock granted",
    );
    this.notify(grant.name, queue);
    return { ...grant };
  }

  private startExpiryTimer(name: string, queue: LockQueue, ttlMs: number): NodeJS.Timeout {
    const timer = setTimeout(() => {
      const held = queue.holder;
      if (held === undefined || held.expiryTimer !== timer) return;
      this.logger.info(
        { lock: name, owner: held.grant.owner, lockId: held.grant.lockId, fencingToken: held.grant.fencingToken, ttlMs },
        "lock expired without a refresh",
      );
      this.endGrant(name, queue);
    }, ttlMs);
    // A grant alone does not keep the process running.
    timer.unref();
    return timer;
  }

  /** Ends the current grant and hands the lock to the first waiter, if any. */
  private endGrant(name: string, queue: LockQueue): void {
    if (queue.holder !== undefined) clearTimeout(queue.holder.expiryTimer);
    queue.holder = undefined;
    const next = queue.waiters.shift();
    if (next === undefined) {
      if (this.queues.get(name) === queue) this.queues.delete(name);
      this.notify(name, queue);
      return;
    }
    this.detachWaiter(next);
    next.resolve(this.grant(next.options, queue, next.requestedAt));
  }

  /** Removes a waiter that timed out, was cancelled or was ended by `close`, and rejects its acquire. */
  private endWait(queue: LockQueue, waiter: Waiter, error: unknown): void {
    const index = queue.waiters.indexOf(waiter);
    if (index < 0) return;
    queue.waiters.splice(index, 1);
    this.detachWaiter(waiter);
    const { name, owner } = waiter.options;
    this.logger.info({ lock: name, owner, waitMs: Date.now() - waiter.requestedAt }, "lock request ended without a grant");
    waiter.reject(error);
  }

  private detachWaiter(waiter: Waiter): void {
    clearTimeout(waiter.timeoutTimer);
    waiter.options.signal.removeEventListener("abort", waiter.onAbort);
  }

  private timedOut(options: AcquireOptions, queue: LockQueue): Error {
    return acquireTimedOut(options.name, options.timeoutMs, this.holderOf(queue));
  }

  private holderOf(queue: LockQueue | undefined): Holder {
    const grant = queue?.holder?.grant;
    if (grant === undefined) return undefined;
    const { lockId: _lockId, ...holder } = grant;
    return holder;
  }

  private notify(name: string, queue: LockQueue): void {
    const listeners = this.listeners.get(name);
    if (listeners === undefined) return;
    const holder = this.holderOf(queue);
    for (const listener of [...listeners]) this.callListener(name, listener, holder);
  }

  private callListener(name: string, listener: HolderListener, holder: Holder): void {
    try {
      listener(holder);
    } catch (error) {
      this.logger.warn({ err: error, lock: name }, "lock holder listener threw");
    }
  }
}
