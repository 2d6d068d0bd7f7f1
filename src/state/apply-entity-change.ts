import { clone, create, type DescField, type DescMessage } from "@bufbuild/protobuf";
import { reflect, type ReflectMessage } from "@bufbuild/protobuf/reflect";
import { TimestampSchema, type Timestamp } from "@bufbuild/protobuf/wkt";
import {
  EntityKind,
  ModelChangeSchema,
  ModelCountersSchema,
  ModelTimesSchema,
  PoolChangeSchema,
  PoolCountersSchema,
  PoolTimesSchema,
  ProviderChangeSchema,
  ProviderCountersSchema,
  ProviderTimesSchema,
  type ModelChange,
  type PoolChange,
  type ProviderChange,
} from "../gen/modelmesh/state/v1/changes_pb.js";
import { ModelStateSchema, PoolStateSchema, ProviderStateSchema, type PoolState } from "../gen/modelmesh/state/v1/state_pb.js";
import { failedPrecondition, invalidArgument } from "../server/service-error.js";
import { entityKindName, type AnyEntityChange, type EntityValue } from "./entity.js";
import { maxPoolMembers } from "./state-limits.js";

/**
 * Messages of one entity kind. The fields of `counters` and `times` carry the
 * proto names of the `state` fields that they add to or keep the latest of.
 */
export interface EntitySchemas {
  readonly state: DescMessage;
  readonly change: DescMessage;
  readonly counters: DescMessage;
  readonly times: DescMessage;
}

const modelSchemas: EntitySchemas = {
  state: ModelStateSchema,
  change: ModelChangeSchema,
  counters: ModelCountersSchema,
  times: ModelTimesSchema,
};

const providerSchemas: EntitySchemas = {
  state: ProviderStateSchema,
  change: ProviderChangeSchema,
  counters: ProviderCountersSchema,
  times: ProviderTimesSchema,
};

const poolSchemas: EntitySchemas = {
  state: PoolStateSchema,
  change: PoolChangeSchema,
  counters: PoolCountersSchema,
  times: PoolTimesSchema,
};

/** Returns the messages of a kind. Throws for ENTITY_KIND_UNSPECIFIED and unknown kinds. */
export function schemasOfKind(kind: EntityKind): EntitySchemas {
  switch (kind) {
    case EntityKind.MODEL:
      return modelSchemas;
    case EntityKind.PROVIDER:
      return providerSchemas;
    case EntityKind.POOL:
      return poolSchemas;
    default:
      throw new Error(`cannot use entity kind ${kind}: expected model, provider or pool`);
  }
}

/** Returns the top-level field of `schema` with the proto name `name`, such as "tokens_used". */
export function fieldNamed(schema: DescMessage, name: string): DescField | undefined {
  return schema.fields.find((field) => field.name === name);
}

/** The change message of any kind. */
export type EntityChangeMessage = ModelChange | ProviderChange | PoolChange;

/** Action when an addition would take a counter out of its range. */
export type CounterOverflow = "reject" | "clamp";

/** Options of applyChangeParts, which mergeEntityChanges sets differently from applyEntityChange. */
export interface ApplyOptions {
  /** Names the entity in errors, such as `model "gpt-4o"`. */
  label: string;
  /** Returns false for a field of set_fields that the change must skip. */
  writesField: (field: DescField) => boolean;
  /** "reject" throws FAILED_PRECONDITION, and "clamp" ends the counter at the nearest bound. */
  counterOverflow: CounterOverflow;
}

/** Largest value of an int64 field. */
const maxInt64 = 2n ** 63n - 1n;

/**
 * Shortfall below zero that a double counter treats as rounding error, as a
 * fraction of the larger of the stored value and the amount. Subtracting in
 * parts what was added in parts can end at about -3e-17 instead of 0, and such
 * a result ends at 0 instead of failing.
 */
const doubleRoundingTolerance = 1e-9;

/**
 * Applies one change to the stored value of its entity and returns the new
 * value, or undefined when the change removes the entity. An entity that is
 * not stored starts from the default message of its kind. Neither `stored`
 * nor the change is modified.
 *
 * The parts apply in the order remove, set, add, keep_latest. Throws
 * FAILED_PRECONDITION when an addition would take a counter below zero or
 * past its maximum. Throws INVALID_ARGUMENT for a set_fields path that names
 * no field, which validateUpdateRequest rejects earlier.
 *
 * @param entityLabel names the entity in errors; default such as `model "gpt-4o"`.
 */
export function applyEntityChange(
  entry: AnyEntityChange,
  stored: EntityValue | undefined,
  entityLabel?: string,
): EntityValue | undefined {
  const label = entityLabel ?? entityLabelOf(entry.kind, entry.change.id);
  const value = applyChangeParts(entry, stored, { label, writesField: () => true, counterOverflow: "reject" });
  if (entry.kind === EntityKind.POOL && value !== undefined) assertPoolSize(value as PoolState, label);
  return value;
}

/**
 * Keeps a pool within the member limit that Save enforces, so that a state
 * read with Load can always be saved again.
 */
function assertPoolSize(pool: PoolState, label: string): void {
  const members = pool.activeModels.length + pool.standbyModels.length;
  if (members > maxPoolMembers) {
    throw failedPrecondition(`cannot update ${label}: it would list ${members} models, over the limit of ${maxPoolMembers}`);
  }
}

/** Returns the name of an entity in messages, such as `model "gpt-4o"`. */
export function entityLabelOf(kind: EntityKind, id: string): string {
  return `${entityKindName(kind)} ${JSON.stringify(id)}`;
}

/** Applies one change as applyEntityChange does, with the choices of `options`. */
export function applyChangeParts(
  entry: AnyEntityChange,
  stored: EntityValue | undefined,
  options: ApplyOptions,
): EntityValue | undefined {
  const change: EntityChangeMessage = entry.change;
  if (change.remove) {
    return undefined;
  }

  const schemas = schemasOfKind(entry.kind);
  if (stored !== undefined && stored.$typeName !== schemas.state.typeName) {
    throw new Error(`cannot update ${options.label}: the stored value is a ${stored.$typeName}`);
  }
  const value = stored === undefined ? create(schemas.state) : clone(schemas.state, stored);
  const target = reflect(schemas.state, value);

  writeSetFields(schemas.state, change, target, options);
  addCounters(schemas, change, target, options);
  keepLatestTimes(schemas, change, target);
  return value as EntityValue;
}

/** Copies the fields that set_fields names from `set`. A named field that is unset in `set` is cleared. */
function writeSetFields(
  stateSchema: DescMessage,
  change: EntityChangeMessage,
  target: ReflectMessage,
  options: ApplyOptions,
): void {
  const paths = change.setFields?.paths ?? [];
  if (paths.length === 0) {
    return;
  }

  // A copy of set, so that lists and messages moved into the result are not shared with the change.
  const source = reflect(stateSchema, change.set === undefined ? create(stateSchema) : clone(stateSchema, change.set));
  for (const path of paths) {
    const field = fieldNamed(stateSchema, path);
    if (field === undefined) {
      throw invalidArgument(`cannot update ${options.label}: set_fields names unknown field "${path}" of ${stateSchema.name}`);
    }
    if (!options.writesField(field)) {
      continue;
    }
    if (source.isSet(field)) {
      target.set(field, source.get(field));
    } else {
      target.clear(field);
    }
  }
}

function addCounters(
  schemas: EntitySchemas,
  change: EntityChangeMessage,
  target: ReflectMessage,
  options: ApplyOptions,
): void {
  if (change.add === undefined) {
    return;
  }

  const amounts = reflect(schemas.counters, change.add);
  for (const amountField of schemas.counters.fields) {
    const field = stateFieldOf(schemas, amountField);
    const amount = amounts.get(amountField);
    const current = target.get(field);
    if (typeof amount === "bigint" && typeof current === "bigint") {
      if (amount !== 0n) {
        target.set(field, addInt64(current, amount, field, options));
      }
    } else if (typeof amount === "number" && typeof current === "number") {
      if (amount !== 0) {
        target.set(field, addDouble(current, amount, field, options));
      }
    } else {
      throw new Error(`cannot add ${amountField.toString()} to ${field.toString()}: the field types differ`);
    }
  }
}

function addInt64(current: bigint, amount: bigint, field: DescField, options: ApplyOptions): bigint {
  const sum = current + amount;
  if (sum < 0n) {
    return rejectOrClamp(0n, `${field.name} would become ${sum}`, options);
  }
  if (sum > maxInt64) {
    return rejectOrClamp(maxInt64, `${field.name} would become ${sum}, over the int64 maximum of ${maxInt64}`, options);
  }
  return sum;
}

function addDouble(current: number, amount: number, field: DescField, options: ApplyOptions): number {
  const sum = current + amount;
  if (!Number.isFinite(sum)) {
    return rejectOrClamp(Number.MAX_VALUE, `${field.name} would become ${sum}`, options);
  }
  if (sum < 0) {
    const tolerance = doubleRoundingTolerance * Math.max(Math.abs(current), Math.abs(amount));
    if (sum >= -tolerance) {
      return 0;
    }
    return rejectOrClamp(0, `${field.name} would become ${sum}`, options);
  }
  return sum;
}

function rejectOrClamp<T>(bound: T, reason: string, options: ApplyOptions): T {
  if (options.counterOverflow === "clamp") {
    return bound;
  }
  throw failedPrecondition(`cannot update ${options.label}: ${reason}`);
}

/** Replaces each stored time with the given one when the given time is later or nothing is stored. */
function keepLatestTimes(schemas: EntitySchemas, change: EntityChangeMessage, target: ReflectMessage): void {
  if (change.keepLatest === undefined) {
    return;
  }

  const times = reflect(schemas.times, change.keepLatest);
  for (const timeField of schemas.times.fields) {
    const candidate = timestampOf(times, timeField);
    if (candidate === undefined) {
      continue;
    }
    const field = stateFieldOf(schemas, timeField);
    const current = timestampOf(target, field);
    if (current === undefined || compareTimestamps(candidate, current) > 0) {
      target.set(field, reflect(TimestampSchema, clone(TimestampSchema, candidate)));
    }
  }
}

/** Returns the Timestamp in a message field, or undefined when the field is unset. */
export function timestampOf(message: ReflectMessage, field: DescField): Timestamp | undefined {
  if (!message.isSet(field)) {
    return undefined;
  }
  const value = message.get(field);
  return (value as ReflectMessage).message as Timestamp;
}

/** Returns a negative number, zero or a positive number as `a` is earlier than, equal to or later than `b`. */
export function compareTimestamps(a: Timestamp, b: Timestamp): number {
  if (a.seconds !== b.seconds) {
    return a.seconds < b.seconds ? -1 : 1;
  }
  return a.nanos - b.nanos;
}

/** Returns the state field that a field of the counters or times message names. */
function stateFieldOf(schemas: EntitySchemas, partField: DescField): DescField {
  const field = fieldNamed(schemas.state, partField.name);
  if (field === undefined) {
    throw new Error(`cannot find the field of ${schemas.state.typeName} for ${partField.toString()}`);
  }
  return field;
}
