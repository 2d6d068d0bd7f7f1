import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { EntityKind } from "../gen/modelmesh/state/v1/changes_pb.js";
import type { SystemState } from "../gen/modelmesh/state/v1/state_pb.js";
import { entityKey, type EntityEvent } from "../state/entity.js";
import { parseEntityKey, putIntoState, type EntityDecoder } from "./etcd-follow-keys.js";
import { emptyState } from "./etcd-snapshot-layout.js";

/**
 * Encoded bytes of every entity as the follower's handlers last received it,
 * keyed by `entityKey`. Bytes take far less memory than decoded messages, and
 * comparing them shows whether a save changed an entity.
 */
export type EntityMirror = Map<string, Buffer>;

/** One model, provider or pool key of a generation, as read from etcd. */
export interface GenerationEntry {
  kind: EntityKind;
  id: string;
  /** The full etcd key, for log lines. */
  key: string;
  value: Buffer;
}

/**
 * Returns a copy of `value`. The etcd client decodes bytes fields as slices of
 * the whole gRPC message (protobufjs 7 `Reader.bytes`), so keeping the slice
 * would keep the whole response in memory.
 */
function detach(value: Buffer): Buffer {
  return Buffer.from(value);
}

/** Decodes a whole generation into a SystemState and the mirror that matches it. */
export class SnapshotBuilder {
  private readonly state: SystemState;
  private readonly entries: EntityMirror = new Map();

  constructor(
    timestamp: Timestamp | undefined,
    private readonly decoder: EntityDecoder,
  ) {
    this.state = emptyState(timestamp);
  }

  /** Adds one entity. A value that cannot be decoded is logged and left out of the state and the mirror. */
  add(entry: GenerationEntry): void {
    const value = this.decoder.decode(entry.kind, entry.value, entry.key);
    if (value === undefined) return;
    putIntoState(this.state, entry.kind, entry.id, value);
    this.entries.set(entityKey(entry.kind, entry.id), detach(entry.value));
  }

  finish(): { state: SystemState; mirror: EntityMirror } {
    this.decoder.endBatch();
    return { state: this.state, mirror: this.entries };
  }
}

/**
 * Compares a whole generation, read at the revision that made it current,
 * with the mirror, and builds the events that turn the mirror's contents into
 * the generation's: one for each entity added, changed or removed.
 */
export class GenerationDiff {
  private readonly entries: EntityMirror = new Map();
  private readonly events: EntityEvent[] = [];

  constructor(
    private readonly previous: ReadonlyMap<string, Buffer>,
    private readonly revision: bigint,
    private readonly decoder: EntityDecoder,
  ) {}

  add(entry: GenerationEntry): void {
    const key = entityKey(entry.kind, entry.id);
    const old = this.previous.get(key);
    if (old?.equals(entry.value)) {
      this.entries.set(key, old);
      return;
    }
    const value = this.decoder.decode(entry.kind, entry.value, entry.key);
    if (value === undefined) {
      // Skipping the value keeps what the handlers last heard of this entity, as for a watch event.
      if (old !== undefined) this.entries.set(key, old);
      return;
    }
    this.entries.set(key, detach(entry.value));
    this.events.push({ revision: this.revision, kind: entry.kind, id: entry.id, value });
  }

  /** Adds a removal event for each entity of the mirror that the generation lacks, and returns the result. */
  finish(): { mirror: EntityMirror; events: EntityEvent[] } {
    this.decoder.endBatch();
    for (const key of this.previous.keys()) {
      if (this.entries.has(key)) continue;
      const { kind, id } = parseEntityKey(key);
      this.events.push({ revision: this.revision, kind, id, value: undefined });
    }
    return { mirror: this.entries, events: this.events };
  }
}

/** Returns a removal event at `revision` for every entity of `mirror`. */
export function removalEvents(mirror: ReadonlyMap<string, Buffer>, revision: bigint): EntityEvent[] {
  return [...mirror.keys()].map((key) => ({ revision, ...parseEntityKey(key), value: undefined }));
}

/** Stores the bytes of an entity put into the mirror. */
export function mirrorPut(mirror: EntityMirror, kind: EntityKind, id: string, value: Buffer): void {
  mirror.set(entityKey(kind, id), detach(value));
}
