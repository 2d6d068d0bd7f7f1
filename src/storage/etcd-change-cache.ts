import type { IRangeResponse } from "etcd3";
import { parseCurrentPointer } from "./etcd-snapshot-layout.js";

/** State of `P/current` when last read: the generation it names (undefined when absent) and its mod_revision. */
export interface CachedCurrent {
  generation: string | undefined;
  modRevision: string;
}

/** An entity key of the current generation as last read or written: its value (undefined when absent) and mod_revision. */
export interface CachedEntity {
  value: Buffer | undefined;
  modRevision: string;
}

/**
 * The values a writer last read or committed. A commit compares every
 * mod_revision it took from here, so a stale entry costs one failed
 * transaction and never a wrong commit. Entity entries belong to the
 * generation of `current` and are dropped when it changes. The oldest
 * entries are evicted beyond `maxEntities`.
 */
export class ReadCache {
  private currentEntry: CachedCurrent | undefined;
  private readonly entities = new Map<string, CachedEntity>();

  constructor(private readonly maxEntities: number) {}

  get current(): CachedCurrent | undefined {
    return this.currentEntry;
  }

  setCurrent(next: CachedCurrent): void {
    if (this.currentEntry?.generation !== next.generation) this.entities.clear();
    this.currentEntry = next;
  }

  /**
   * Returns the entry of a key relative to the generation folder, such as
   * `models/gpt-4o`, and marks it as recently used. So a group that looks up
   * its keys before it reads the missing ones cannot evict its own entries.
   */
  get(relativeKey: string): CachedEntity | undefined {
    const entry = this.entities.get(relativeKey);
    if (entry !== undefined) this.set(relativeKey, entry);
    return entry;
  }

  set(relativeKey: string, entry: CachedEntity): void {
    // Deleting first moves the key to the end of the insertion order, which is the eviction order.
    this.entities.delete(relativeKey);
    this.entities.set(relativeKey, entry);
    if (this.entities.size > this.maxEntities) {
      const oldest = this.entities.keys().next();
      if (!oldest.done) this.entities.delete(oldest.value);
    }
  }

  delete(relativeKey: string): void {
    this.entities.delete(relativeKey);
  }

  /** Forgets everything, for when the outcome of a commit is unknown. */
  clear(): void {
    this.currentEntry = undefined;
    this.entities.clear();
  }
}

/** Returns what a range of `P/current` shows, throwing UNAVAILABLE when the pointer cannot be parsed. */
export function currentOf(response: IRangeResponse | undefined, key: Buffer): CachedCurrent {
  const entry = response?.kvs[0];
  if (entry === undefined) return { generation: undefined, modRevision: "0" };
  return { generation: parseCurrentPointer(entry.value, key.toString()).generation, modRevision: entry.mod_revision };
}
