import { createHash } from "node:crypto";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { sizeDelimitedEncode, sizeDelimitedPeek } from "@bufbuild/protobuf/wire";
import { EntityChangeSchema, EntityKind, type EntityChange } from "../gen/modelmesh/state/v1/changes_pb.js";
import {
  ModelStateSchema,
  PoolStateSchema,
  ProviderStateSchema,
  type ModelState,
  type PoolState,
  type ProviderState,
} from "../gen/modelmesh/state/v1/state_pb.js";
import { invalidArgument, resourceExhausted, unavailable } from "../server/service-error.js";
import { entityKindName, type EntityValue } from "../state/entity.js";
import type { EntityKind as EntityFolder } from "./etcd-snapshot-layout.js";

/** Returns the folder of a generation that contains entities of `kind`, throwing INVALID_ARGUMENT for an unknown kind. */
export function entityFolder(kind: EntityKind, id: string): EntityFolder {
  switch (kind) {
    case EntityKind.MODEL:
      return "models";
    case EntityKind.PROVIDER:
      return "providers";
    case EntityKind.POOL:
      return "pools";
    default:
      throw invalidArgument(`cannot update entity "${id}": kind ${kind} is not a model, provider or pool`);
  }
}

/** Returns the key of an entity relative to its generation folder, such as `models/gpt-4o`. */
export function relativeEntityKey(kind: EntityKind, id: string): string {
  return `${entityFolder(kind, id)}/${id}`;
}

/** Decodes a stored entity, throwing UNAVAILABLE when the bytes are not a valid message of its kind. */
export function decodeEntityValue(kind: EntityKind, id: string, bytes: Uint8Array): EntityValue {
  try {
    switch (kind) {
      case EntityKind.MODEL:
        return fromBinary(ModelStateSchema, bytes);
      case EntityKind.PROVIDER:
        return fromBinary(ProviderStateSchema, bytes);
      case EntityKind.POOL:
        return fromBinary(PoolStateSchema, bytes);
      default:
        throw new Error(`kind ${kind} is not a model, provider or pool`);
    }
  } catch (error) {
    throw unavailable(`cannot decode ${entityKindName(kind)} "${id}" read from etcd: ${(error as Error).message}`, error);
  }
}

/**
 * Encodes the value that a compute returned. A value of another message type
 * is a programming error and throws a plain Error. A value over
 * `maxEntityBytes` throws RESOURCE_EXHAUSTED.
 */
export function encodeEntityValue(kind: EntityKind, id: string, value: EntityValue, maxEntityBytes: number): Buffer {
  const bytes = toBinaryOfKind(kind, id, value);
  const encoded = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (encoded.length > maxEntityBytes) {
    throw resourceExhausted(
      `cannot update ${entityKindName(kind)} "${id}": its encoded state is ${encoded.length} bytes, ` +
        `over the etcd limit of ${maxEntityBytes} bytes`,
    );
  }
  return encoded;
}

function toBinaryOfKind(kind: EntityKind, id: string, value: EntityValue): Uint8Array {
  const expected = schemaOf(kind).typeName;
  if (value.$typeName !== expected) {
    throw new Error(`the compute of ${entityKindName(kind)} "${id}" returned a ${value.$typeName}, expected ${expected}`);
  }
  switch (kind) {
    case EntityKind.MODEL:
      return toBinary(ModelStateSchema, value as ModelState);
    case EntityKind.PROVIDER:
      return toBinary(ProviderStateSchema, value as ProviderState);
    default:
      return toBinary(PoolStateSchema, value as PoolState);
  }
}

function schemaOf(kind: EntityKind): typeof ModelStateSchema | typeof ProviderStateSchema | typeof PoolStateSchema {
  switch (kind) {
    case EntityKind.MODEL:
      return ModelStateSchema;
    case EntityKind.PROVIDER:
      return ProviderStateSchema;
    default:
      return PoolStateSchema;
  }
}

/** Returns the SHA-256 hex digest that names the etcd record of an idempotency key. */
export function idempotencyDigest(idempotencyKey: string): string {
  return createHash("sha256").update(idempotencyKey, "utf8").digest("hex");
}

/** One entity of an idempotency record: the value its request committed, or undefined when it deleted the entity. */
export interface RecordedValue {
  kind: EntityKind;
  id: string;
  value: EntityValue | undefined;
}

/**
 * Encodes the record of an idempotent request as size-delimited EntityChange
 * messages, one per write in request order, with revision 0. The commit
 * revision is not known before the commit applies, so a replay takes it from
 * the record's mod_revision, which etcd sets to the revision of the
 * transaction that created the record.
 */
export function encodeIdempotencyRecord(entries: readonly RecordedValue[]): Buffer {
  return Buffer.concat(entries.map((entry) => sizeDelimitedEncode(EntityChangeSchema, entityChangeOf(entry))));
}

/** Decodes a record that `encodeIdempotencyRecord` wrote, throwing UNAVAILABLE when it is malformed. */
export function decodeIdempotencyRecord(bytes: Uint8Array, key: string): RecordedValue[] {
  const entries: RecordedValue[] = [];
  let offset = 0;
  try {
    while (offset < bytes.length) {
      const peek = sizeDelimitedPeek(bytes.subarray(offset));
      if (peek.eof || offset + peek.offset + peek.size > bytes.length) {
        throw new Error(`the record is truncated at byte ${offset}`);
      }
      const start = offset + peek.offset;
      const change = fromBinary(EntityChangeSchema, bytes.subarray(start, start + peek.size));
      entries.push({ kind: change.kind, id: change.id, value: valueOf(change) });
      offset = start + peek.size;
    }
  } catch (error) {
    throw unavailable(`cannot parse the idempotency record at etcd key "${key}": ${(error as Error).message}`, error);
  }
  return entries;
}

function entityChangeOf(entry: RecordedValue): EntityChange {
  const change = create(EntityChangeSchema, { kind: entry.kind, id: entry.id });
  if (entry.value === undefined) {
    change.value = { case: "removed", value: true };
    return change;
  }
  switch (entry.kind) {
    case EntityKind.MODEL:
      change.value = { case: "model", value: entry.value as ModelState };
      break;
    case EntityKind.PROVIDER:
      change.value = { case: "provider", value: entry.value as ProviderState };
      break;
    default:
      change.value = { case: "pool", value: entry.value as PoolState };
      break;
  }
  return change;
}

function valueOf(change: EntityChange): EntityValue | undefined {
  switch (change.value.case) {
    case "model":
    case "provider":
    case "pool":
      return change.value.value;
    case "removed":
      return undefined;
    default:
      throw new Error(`the entry of ${entityKindName(change.kind)} "${change.id}" has no value`);
  }
}
