import type { EntityEvent } from "./entity.js";

export interface ChangeLogOptions {
  /** Most events kept for resuming watches. Default 100,000. */
  maxEvents?: number;
}

/** Result of reading the log after a revision. */
export type ChangeLogRead =
  | { kind: "events"; events: EntityEvent[]; revision: bigint }
  | { kind: "too-old"; oldestRevision: bigint };

/**
 * The recent committed changes of the state, shared by every WatchState
 * stream of the daemon. Streams keep only a revision cursor into it, so a
 * slow stream costs no memory of its own. Events are kept up to `maxEvents`;
 * a stream whose cursor falls behind the oldest kept event needs a resync.
 */
export class ChangeLog {
  private readonly maxEvents: number;
  private readonly events: EntityEvent[] = [];
  /** Index in `events` of the oldest kept event; trimmed lazily to keep appends cheap. */
  private start = 0;
  /** Revision before the oldest event that can be read: resuming after it needs no resync. */
  private horizon: bigint;
  private latestRevision: bigint;
  private readonly listeners = new Set<() => void>();

  constructor(startRevision: bigint, options: ChangeLogOptions = {}) {
    this.maxEvents = options.maxEvents ?? 100_000;
    this.horizon = startRevision;
    this.latestRevision = startRevision;
  }

  /** Revision of the latest change or progress that the log has seen. */
  get revision(): bigint {
    return this.latestRevision;
  }

  /** Oldest revision a stream may resume after without a resync. */
  get oldestResumableRevision(): bigint {
    return this.horizon;
  }

  get size(): number {
    return this.events.length - this.start;
  }

  /** Appends the events of one revision, which must not be older than the log's revision. */
  append(events: EntityEvent[], revision: bigint): void {
    if (revision < this.latestRevision) {
      throw new Error(`cannot append revision ${revision} to the change log: it is at revision ${this.latestRevision}`);
    }
    this.events.push(...events);
    this.latestRevision = revision;
    this.trim();
    this.notify();
  }

  /** Records that nothing changed up to `revision`, so streams can report progress. */
  advance(revision: bigint): void {
    if (revision <= this.latestRevision) return;
    this.latestRevision = revision;
    this.notify();
  }

  /**
   * Forgets every event, as after a resync: streams that resume from before
   * `revision` get a snapshot.
   */
  reset(revision: bigint): void {
    this.events.length = 0;
    this.start = 0;
    this.horizon = revision;
    this.latestRevision = revision;
    this.notify();
  }

  /**
   * Returns the events after `afterRevision`: about `limit` of them, but
   * always whole revisions, so a revision's events are never split across two
   * reads. Returns "too-old" if some of the events were dropped.
   */
  readAfter(afterRevision: bigint, limit: number): ChangeLogRead {
    if (afterRevision < this.horizon) return { kind: "too-old", oldestRevision: this.horizon };
    const first = this.firstIndexAfter(afterRevision);
    let end = Math.min(first + limit, this.events.length);
    if (end > first) {
      const lastRevision = this.events[end - 1]!.revision;
      while (end < this.events.length && this.events[end]!.revision === lastRevision) end++;
    }
    const events = this.events.slice(first, end);
    const revision = end >= this.events.length ? this.latestRevision : this.events[end - 1]!.revision;
    return { kind: "events", events, revision };
  }

  /** Calls `listener` after each append, advance or reset; returns the function that unsubscribes it. */
  subscribe(listener: () => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  get subscriberCount(): number {
    return this.listeners.size;
  }

  private firstIndexAfter(revision: bigint): number {
    let low = this.start;
    let high = this.events.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (this.events[middle]!.revision <= revision) low = middle + 1;
      else high = middle;
    }
    return low;
  }

  private trim(): void {
    const excess = this.size - this.maxEvents;
    if (excess <= 0) return;
    // Whole revisions are dropped, so a resume never starts inside one.
    let cut = this.start + excess;
    const lastDropped = this.events[cut - 1]!.revision;
    while (cut < this.events.length && this.events[cut]!.revision === lastDropped) cut++;
    this.horizon = lastDropped;
    this.start = cut;
    if (this.start > this.maxEvents) {
      this.events.splice(0, this.start);
      this.start = 0;
    }
  }

  private notify(): void {
    for (const listener of this.listeners) listener();
  }
}
