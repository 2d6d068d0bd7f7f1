/** The lock that SyncStatus reports on, and that requests naming no lock use. */
export const defaultLockName = "state";

/** One grant of a lock to one caller. */
export interface LockGrant {
  name: string;
  /** Id of the grant, stable across refreshes; with etcd, the lease id in hex. */
  lockId: string;
  owner: string;
  acquiredAt: Date;
  expiresAt: Date;
  /** Grows with every grant of the lock; with etcd, the create revision of the holder's queue key. */
  fencingToken: bigint;
}

/** The holder of a lock and the number of callers waiting for it. */
export interface LockDescription {
  name: string;
  /** The current grant, without its lock id; undefined when the lock is free. */
  holder: Omit<LockGrant, "lockId"> | undefined;
  /** Callers queued behind the holder. */
  waiters: number;
}

export interface AcquireOptions {
  name: string;
  owner: string;
  /** How long the grant lasts without a refresh. */
  ttlMs: number;
  /** How long to wait in the queue before giving up with DEADLINE_EXCEEDED. */
  timeoutMs: number;
  /** Ends the wait early: client cancellation, call deadline or shutdown. Its reason is thrown. */
  signal: AbortSignal;
}

/**
 * A fence that `checkFence` verified: the grant it names was current at the
 * check. A connector re-checks it atomically with its commit, so the write
 * lands only while the grant is still current.
 */
export interface VerifiedFence {
  lockName: string;
  token: bigint;
  /** etcd key of the holder's queue entry, whose create revision must still equal `token`. */
  etcdKey?: string;
  /** For in-process locks: whether the grant is still current, checked right before the commit. */
  isCurrent(): boolean;
}

/**
 * Advisory locks that wait in a first-come, first-served queue. Deliberate
 * failures are thrown as ServiceError: DEADLINE_EXCEEDED for a timed-out
 * acquire (naming the lock and its holder), FAILED_PRECONDITION for a grant
 * that has ended, UNAVAILABLE when the backend cannot be reached.
 */
export interface LockService {
  /** Waits until the lock is granted. On timeout or abort it leaves nothing queued behind. */
  acquire(options: AcquireOptions): Promise<LockGrant>;

  /** Ends a grant, letting the next waiter in. */
  release(name: string, lockId: string): Promise<void>;

  /** Extends a grant by its ttl, returning it with its new expiry. */
  refresh(name: string, lockId: string): Promise<LockGrant>;

  describe(name: string): Promise<LockDescription>;

  /** Throws FAILED_PRECONDITION, naming the lock and the current token, unless `token` is the current grant of `name`. */
  checkFence(name: string, token: bigint): Promise<VerifiedFence>;

  /**
   * Calls `listener` with the holder of `name` whenever it changes, and once
   * at the start. With etcd it follows the backend, so every daemon on one
   * cluster reports the same holder. Returns the function that unsubscribes.
   */
  watchHolder(name: string, listener: (holder: LockDescription["holder"]) => void): () => void;

  /** Stops watches and timers, and ends every wait in progress with UNAVAILABLE. */
  close(): Promise<void>;
}
