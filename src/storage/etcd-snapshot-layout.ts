import { randomBytes } from "node:crypto";
import { create, fromBinary, fromJson, toBinary, toJson, type DescMessage, type MessageShape } from "@bufbuild/protobuf";
import { TimestampSchema, type Timestamp } from "@bufbuild/protobuf/wkt";
import {
  ModelStateSchema,
  PoolStateSchema,
  ProviderStateSchema,
  SystemStateSchema,
  type SystemState,
} from "../gen/modelmesh/state/v1/state_pb.js";
import { invalidArgument, resourceExhausted, unavailable } from "../server/service-error.js";

/*
 * Keys of the etcd connector under its prefix P:
 *
 *   P/current                          JSON pointer to the committed generation
 *   P/generations/G/models/ID          protobuf ModelState
 *   P/generations/G/providers/ID       protobuf ProviderState
 *   P/generations/G/pools/ID           protobuf PoolState
 *   P/generations/G/last-change        empty; put by every change writer transaction on generation G
 *   P/staging/G                        exists while generation G is not committed
 *   P/staging-leases/G                 attached to the writer's lease: exists while the writer is alive
 *   P/idempotency/H                    change writer's record of a request, H = SHA-256 hex of its idempotency key
 */

/** Folder name of each entity kind inside a generation. */
export type EntityKind = "models" | "providers" | "pools";

const entityKinds: readonly EntityKind[] = ["models", "providers", "pools"];

/** Singular nouns for messages, such as `cannot save pool "x"`. */
const entityNouns: Record<EntityKind, string> = { models: "model", providers: "provider", pools: "pool" };

/** One model, provider or pool, encoded as the etcd key and value it is stored under. */
export interface EncodedEntity {
  kind: EntityKind;
  id: string;
  key: Buffer;
  value: Buffer;
}

/** Contents of `P/current`. */
export interface CurrentPointer {
  generation: string;
  /** SystemState.timestamp in RFC 3339, absent when the state had none. */
  timestamp?: string;
}

const generationIdPattern = /^[0-9a-f]{12}-[0-9a-f]{16}$/;

/**
 * Key of a generation's change marker, relative to the generation folder.
 * The change writer puts it in every transaction that changes entities of
 * the generation in place, so a copy of the generation can detect, through
 * the marker's mod_revision, that it missed a change. It contains no entity.
 */
export const changeMarkerName = "last-change";

/** Returns whether a key relative to a generation folder, such as `models/gpt-4o`, is the change marker rather than an entity. */
export function isChangeMarker(relativeKey: string): boolean {
  return relativeKey === changeMarkerName;
}

/** Builds the etcd keys of one connector prefix. */
export class SnapshotLayout {
  constructor(readonly prefix: string) {}

  get currentKey(): Buffer {
    return Buffer.from(`${this.prefix}/current`);
  }

  get stagingPrefix(): Buffer {
    return Buffer.from(`${this.prefix}/staging/`);
  }

  get stagingLeasePrefix(): Buffer {
    return Buffer.from(`${this.prefix}/staging-leases/`);
  }

  stagingKey(generation: string): Buffer {
    return Buffer.from(`${this.prefix}/staging/${generation}`);
  }

  stagingLeaseKey(generation: string): Buffer {
    return Buffer.from(`${this.prefix}/staging-leases/${generation}`);
  }

  generationPrefix(generation: string): Buffer {
    return Buffer.from(`${this.prefix}/generations/${generation}/`);
  }

  entityKey(generation: string, kind: EntityKind, id: string): Buffer {
    return Buffer.from(`${this.prefix}/generations/${generation}/${kind}/${id}`);
  }

  changeMarkerKey(generation: string): Buffer {
    return Buffer.from(`${this.prefix}/generations/${generation}/${changeMarkerName}`);
  }

  /** Key of the record of one idempotent request, named by the SHA-256 hex digest of its idempotency key. */
  idempotencyKey(digest: string): Buffer {
    return Buffer.from(`${this.prefix}/idempotency/${digest}`);
  }
}

/**
 * Returns a new generation id: 12 hex digits of milliseconds since the epoch,
 * so ids sort by creation time, then 16 random hex digits, so two daemons
 * saving in the same millisecond never share keys.
 */
export function newGenerationId(): string {
  const timePart = Date.now().toString(16).padStart(12, "0");
  return `${timePart}-${randomBytes(8).toString("hex")}`;
}

/** Returns the first key after every key that starts with `prefix`, the `range_end` of a prefix range. */
export function prefixRangeEnd(prefix: Buffer): Buffer {
  const end = Buffer.from(prefix);
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i]! < 0xff) {
      end[i]! += 1;
      return end.subarray(0, i + 1);
    }
  }
  // A prefix of only 0xff bytes has no upper bound, and etcd reads a range_end of "\0" as the end of the key space.
  return Buffer.from([0]);
}

/**
 * Encodes every model, provider and pool of `state`, rejecting the whole
 * state with RESOURCE_EXHAUSTED when one value exceeds `maxEntityBytes`.
 */
export function encodeEntities(
  layout: SnapshotLayout,
  generation: string,
  state: SystemState,
  maxEntityBytes: number,
): EncodedEntity[] {
  const target = { layout, generation, maxEntityBytes, entities: [] as EncodedEntity[] };
  encodeKind(target, "models", ModelStateSchema, state.models);
  encodeKind(target, "providers", ProviderStateSchema, state.providers);
  encodeKind(target, "pools", PoolStateSchema, state.pools);
  return target.entities;
}

function encodeKind<Desc extends DescMessage>(
  target: { layout: SnapshotLayout; generation: string; maxEntityBytes: number; entities: EncodedEntity[] },
  kind: EntityKind,
  schema: Desc,
  messages: Record<string, MessageShape<Desc>>,
): void {
  for (const [id, message] of Object.entries(messages)) {
    const bytes = toBinary(schema, message);
    const value = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (value.length > target.maxEntityBytes) {
      throw resourceExhausted(
        `cannot save ${entityNouns[kind]} "${id}": its encoded state is ${value.length} bytes, ` +
          `over the etcd limit of ${target.maxEntityBytes} bytes`,
      );
    }
    target.entities.push({ kind, id, key: target.layout.entityKey(target.generation, kind, id), value });
  }
}

/** Returns an empty SystemState, which `decodeEntity` fills. */
export function emptyState(timestamp: Timestamp | undefined): SystemState {
  const state = create(SystemStateSchema);
  if (timestamp !== undefined) state.timestamp = timestamp;
  return state;
}

/**
 * Decodes one key of a generation into `state`. `relativeKey` is the key
 * without the generation prefix, such as `models/gpt-4o`. Everything after
 * the first slash is the id, so ids may contain slashes. The change marker
 * is skipped.
 */
export function decodeEntity(state: SystemState, relativeKey: string, value: Uint8Array, fullKey: string): void {
  if (isChangeMarker(relativeKey)) return;
  const slash = relativeKey.indexOf("/");
  const kind = relativeKey.slice(0, slash);
  const id = relativeKey.slice(slash + 1);
  if (slash < 0 || !entityKinds.includes(kind as EntityKind)) {
    throw unavailable(`cannot load state from etcd: key "${fullKey}" is not a model, provider or pool key`);
  }
  try {
    switch (kind as EntityKind) {
      case "models":
        state.models[id] = fromBinary(ModelStateSchema, value);
        break;
      case "providers":
        state.providers[id] = fromBinary(ProviderStateSchema, value);
        break;
      case "pools":
        state.pools[id] = fromBinary(PoolStateSchema, value);
        break;
    }
  } catch (error) {
    throw unavailable(
      `cannot decode ${entityNouns[kind as EntityKind]} "${id}" from etcd key "${fullKey}": ${(error as Error).message}`,
      error,
    );
  }
}

/** Serializes the pointer that `P/current` stores for a committed generation. */
export function encodeCurrentPointer(generation: string, timestamp: Timestamp | undefined): Buffer {
  const pointer: CurrentPointer = { generation };
  if (timestamp !== undefined) {
    try {
      pointer.timestamp = toJson(TimestampSchema, timestamp) as string;
    } catch (error) {
      throw invalidArgument(`cannot save state: its timestamp is invalid: ${(error as Error).message}`);
    }
  }
  return Buffer.from(JSON.stringify(pointer));
}

/** Parses the value of `P/current`, throwing UNAVAILABLE when it is not a pointer this connector wrote. */
export function parseCurrentPointer(value: Buffer, key: string): { generation: string; timestamp: Timestamp | undefined } {
  let pointer: unknown;
  try {
    pointer = JSON.parse(value.toString("utf8"));
  } catch (error) {
    throw unavailable(`cannot parse etcd key "${key}": ${(error as Error).message}`, error);
  }
  const { generation, timestamp } = (pointer ?? {}) as Partial<Record<keyof CurrentPointer, unknown>>;
  if (typeof generation !== "string" || !generationIdPattern.test(generation)) {
    throw unavailable(`cannot parse etcd key "${key}": "generation" is missing or not a generation id`);
  }
  if (timestamp === undefined) return { generation, timestamp: undefined };
  if (typeof timestamp !== "string") {
    throw unavailable(`cannot parse etcd key "${key}": "timestamp" is not a string`);
  }
  try {
    return { generation, timestamp: fromJson(TimestampSchema, timestamp) };
  } catch (error) {
    throw unavailable(`cannot parse etcd key "${key}": "timestamp" is invalid: ${(error as Error).message}`, error);
  }
}

/** Returns whether `id` has the shape of a generation id, so stray keys under `P/staging/` are left alone. */
export function isGenerationId(id: string): boolean {
  return generationIdPattern.test(id);
}
