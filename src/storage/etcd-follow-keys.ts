import { fromBinary } from "@bufbuild/protobuf";
import type { Logger } from "pino";
import { EntityKind } from "../gen/modelmesh/state/v1/changes_pb.js";
import {
  ModelStateSchema,
  PoolStateSchema,
  ProviderStateSchema,
  type ModelState,
  type PoolState,
  type ProviderState,
  type SystemState,
} from "../gen/modelmesh/state/v1/state_pb.js";
import { entityKindName, type EntityValue } from "../state/entity.js";

/**
 * Role of a key under the connector prefix P for the state follower:
 * `P/current`, an entity `P/generations/G/{models|providers|pools}/ID`, or
 * anything else (staging keys, locks, idempotency records, the
 * `P/generations/G/last-change` marker), which the follower ignores.
 */
export type FollowedKey =
  | { type: "current" }
  | { type: "entity"; generation: string; kind: EntityKind; id: string }
  | { type: "other" };

/** Entity kinds by the folder name that a generation stores them under. */
const kindsByFolder: ReadonlyMap<string, EntityKind> = new Map([
  ["models", EntityKind.MODEL],
  ["providers", EntityKind.PROVIDER],
  ["pools", EntityKind.POOL],
]);

/** Entity kinds by the name that `entityKey` puts before the slash. */
const kindsByName: ReadonlyMap<string, EntityKind> = new Map(
  [EntityKind.MODEL, EntityKind.PROVIDER, EntityKind.POOL].map((kind) => [entityKindName(kind), kind]),
);

const generationsFolder = "generations/";

/** Classifies the keys under one connector prefix. */
export class FollowedKeyParser {
  private readonly keyPrefix: string;

  constructor(prefix: string) {
    this.keyPrefix = `${prefix}/`;
  }

  parse(key: Buffer): FollowedKey {
    const text = key.toString("utf8");
    if (!text.startsWith(this.keyPrefix)) return { type: "other" };
    const relative = text.slice(this.keyPrefix.length);
    if (relative === "current") return { type: "current" };
    if (!relative.startsWith(generationsFolder)) return { type: "other" };

    // Everything after the kind folder is the id, so ids may contain slashes.
    const path = relative.slice(generationsFolder.length);
    const generationEnd = path.indexOf("/");
    const folderEnd = path.indexOf("/", generationEnd + 1);
    if (generationEnd <= 0 || folderEnd < 0) return { type: "other" };
    const kind = kindsByFolder.get(path.slice(generationEnd + 1, folderEnd));
    const id = path.slice(folderEnd + 1);
    if (kind === undefined || id === "") return { type: "other" };
    return { type: "entity", generation: path.slice(0, generationEnd), kind, id };
  }
}

/** Returns the kind and id of a key that `entityKey` built, such as "model/gpt-4o". */
export function parseEntityKey(key: string): { kind: EntityKind; id: string } {
  const slash = key.indexOf("/");
  const kind = kindsByName.get(key.slice(0, slash));
  if (slash < 0 || kind === undefined) throw new Error(`"${key}" is not an entity key such as "model/gpt-4o"`);
  return { kind, id: key.slice(slash + 1) };
}

/** Decodes the protobuf value of one entity, throwing when the bytes are not a valid message of its kind. */
export function decodeEntityValue(kind: EntityKind, value: Uint8Array): EntityValue {
  switch (kind) {
    case EntityKind.MODEL:
      return fromBinary(ModelStateSchema, value);
    case EntityKind.PROVIDER:
      return fromBinary(ProviderStateSchema, value);
    case EntityKind.POOL:
      return fromBinary(PoolStateSchema, value);
    default:
      throw new Error(`unknown entity kind ${kind}`);
  }
}

/** Stores a decoded entity in the map of its kind. */
export function putIntoState(state: SystemState, kind: EntityKind, id: string, value: EntityValue): void {
  switch (kind) {
    case EntityKind.MODEL:
      state.models[id] = value as ModelState;
      break;
    case EntityKind.PROVIDER:
      state.providers[id] = value as ProviderState;
      break;
    case EntityKind.POOL:
      state.pools[id] = value as PoolState;
      break;
    default:
      throw new Error(`unknown entity kind ${kind}`);
  }
}

/** Failures logged one by one per batch. The rest are counted in one summary line. */
const maxLoggedFailuresPerBatch = 10;

/**
 * Decodes entity values read from etcd, logging each value it cannot decode
 * at warn with its key and skipping it, so that a corrupt key never stops the
 * follower. One bad generation logs at most `maxLoggedFailuresPerBatch`
 * lines and then a count.
 */
export class EntityDecoder {
  private failures = 0;

  constructor(private readonly logger: Logger) {}

  /** Returns the decoded value, or undefined after logging why `value` cannot be decoded. */
  decode(kind: EntityKind, value: Uint8Array, key: string): EntityValue | undefined {
    try {
      return decodeEntityValue(kind, value);
    } catch (error) {
      if (this.failures++ < maxLoggedFailuresPerBatch) {
        this.logger.warn({ err: error, key, bytes: value.length }, `cannot decode ${entityKindName(kind)} from etcd, skipping the key`);
      }
      return undefined;
    }
  }

  /** Logs how many failures of the batch that just ended were not logged one by one, and starts a new batch. */
  endBatch(): void {
    const unlogged = this.failures - maxLoggedFailuresPerBatch;
    if (unlogged > 0) this.logger.warn({ unlogged, failures: this.failures }, "more entity values could not be decoded and were skipped");
    this.failures = 0;
  }
}
