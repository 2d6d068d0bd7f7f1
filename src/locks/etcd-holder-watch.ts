import type { Watcher } from "etcd3";
import type { Logger } from "pino";
import type { EtcdLockStore } from "./etcd-lock-store.js";
import type { LockDescription } from "./lock-service.js";

type Holder = LockDescription["holder"];
type HolderListener = (holder: Holder) => void;

/**
 * States of a holder watch. `reading` has no etcd watch yet or lost it;
 * `watching` has one that started right after the last read; `closed` is final.
 */
type HolderWatchState = "reading" | "watching" | "closed";

/** Services that a holder watch uses from its lock service. */
export interface HolderWatchContext {
  store: EtcdLockStore;
  logger: Logger;
  retryIntervalMs: number;
  /** Reads the holder and the revision it was read at. */
  readHolder(name: string): Promise<{ holder: Holder; revision: bigint }>;
}

/**
 * One etcd watch on the queue of one lock, shared by every listener of that
 * lock. Each event makes it read the holder again, and listeners hear of a
 * holder that differs from the last one they heard of.
 */
export class EtcdHolderWatch {
  private state: HolderWatchState = "reading";
  private readonly listeners = new Set<HolderListener>();
  private watcher: Watcher | undefined;
  /** The last holder that listeners heard of; `known` is false until the first read. */
  private current: Holder;
  private known = false;
  private reading = false;
  private readAgain = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private failedReads = 0;

  constructor(
    private readonly context: HolderWatchContext,
    private readonly name: string,
  ) {}

  get listenerCount(): number {
    return this.listeners.size;
  }

  /** Adds a listener; it hears of the current holder once the first read is done. */
  subscribe(listener: HolderListener): void {
    this.listeners.add(listener);
    if (this.known) {
      const holder = this.current;
      // Deferred, so the listener never runs before `watchHolder` has returned its unsubscribe function.
      queueMicrotask(() => {
        if (this.listeners.has(listener)) this.callListener(listener, holder);
      });
    } else if (this.listeners.size === 1) {
      void this.sync();
    }
  }

  unsubscribe(listener: HolderListener): void {
    this.listeners.delete(listener);
  }

  close(): void {
    if (this.state === "closed") return;
    this.state = "closed";
    this.listeners.clear();
    clearTimeout(this.retryTimer);
    this.dropWatcher();
  }

  /** Reads the holder until no event arrived during the read; on failure, tries again after the retry interval. */
  private async sync(): Promise<void> {
    if (this.isClosed()) return;
    if (this.reading) {
      this.readAgain = true;
      return;
    }
    this.reading = true;
    clearTimeout(this.retryTimer);
    try {
      do {
        this.readAgain = false;
        const { holder, revision } = await this.context.readHolder(this.name);
        if (this.isClosed()) return;
        if (this.failedReads > 0) {
          this.context.logger.info({ lock: this.name, failedReads: this.failedReads }, "holder watch reads the lock again");
          this.failedReads = 0;
        }
        // The watch starts after the revision just read, so no change between the read and the watch is missed.
        if (this.watcher === undefined) this.startWatcher(revision + 1n);
        this.publish(holder);
      } while (this.readAgain);
    } catch (error) {
      if (this.isClosed()) return;
      // Logged once per outage, not once per retry.
      if (this.failedReads++ === 0) {
        this.context.logger.warn({ err: error, lock: this.name }, "cannot read the holder of a watched lock, retrying");
      }
      this.retryTimer = setTimeout(() => void this.sync(), this.context.retryIntervalMs);
    } finally {
      this.reading = false;
    }
  }

  // A method, so TypeScript does not narrow `state` across the awaits in `sync`.
  private isClosed(): boolean {
    return this.state === "closed";
  }

  private startWatcher(startRevision: bigint): void {
    const watcher = this.context.store.watchQueue(this.name, startRevision);
    this.watcher = watcher;
    this.state = "watching";
    watcher.on("data", () => {
      if (this.watcher === watcher) void this.sync();
    });
    // After a reconnect, etcd3 replays events from the last revision it saw, and a read covers any gap.
    let connections = 0;
    watcher.on("connected", () => {
      if (this.watcher !== watcher || connections++ === 0) return;
      this.context.logger.debug({ lock: this.name }, "holder watch reconnected");
      void this.sync();
    });
    watcher.on("disconnected", (error) => {
      if (this.watcher === watcher) this.context.logger.debug({ err: error, lock: this.name }, "holder watch disconnected");
    });
    // etcd3 1.1.2 emits "error" once when etcd cancels a watch, after a compaction for one, and then
    // never serves that watcher again. A new watcher starts from a fresh read.
    watcher.on("error", (error) => {
      if (this.watcher !== watcher) return;
      this.context.logger.info({ err: error, lock: this.name }, "holder watch cancelled by etcd, watching again");
      this.dropWatcher();
      this.state = "reading";
      void this.sync();
    });
  }

  private dropWatcher(): void {
    const watcher = this.watcher;
    this.watcher = undefined;
    watcher?.cancel().catch((error: unknown) => this.context.logger.debug({ err: error, lock: this.name }, "cannot cancel a holder watch"));
  }

  private publish(holder: Holder): void {
    if (this.known && sameHolder(this.current, holder)) return;
    this.known = true;
    this.current = holder;
    for (const listener of [...this.listeners]) this.callListener(listener, holder);
  }

  private callListener(listener: HolderListener, holder: Holder): void {
    try {
      listener(holder);
    } catch (error) {
      this.context.logger.warn({ err: error, lock: this.name }, "lock holder listener threw");
    }
  }
}

/** Compares grants, not expiry times: a refresh moves `expiresAt` without an etcd event. */
function sameHolder(a: Holder, b: Holder): boolean {
  if (a === undefined || b === undefined) return a === b;
  return a.fencingToken === b.fencingToken && a.owner === b.owner && a.acquiredAt.getTime() === b.acquiredAt.getTime();
}
