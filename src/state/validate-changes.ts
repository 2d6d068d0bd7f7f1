import type { DescMessage } from "@bufbuild/protobuf";
import { reflect } from "@bufbuild/protobuf/reflect";
import { EntityKind } from "../gen/modelmesh/state/v1/changes_pb.js";
import type { UpdateStateRequest } from "../gen/modelmesh/state/v1/state_manager_service_pb.js";
import {
  DeactivationReason,
  ModelStatus,
  type ModelState,
  type PoolState,
  type ProviderState,
} from "../gen/modelmesh/state/v1/state_pb.js";
import { invalidArgument, resourceExhausted } from "../server/service-error.js";
import { fieldNamed, schemasOfKind, timestampOf, type EntityChangeMessage } from "./apply-entity-change.js";
import { maxPoolMembers } from "./state-limits.js";
import {
  validateCounter,
  validateEnum,
  validateFraction,
  validateId,
  validateNonNegative,
  validateTimestamp,
} from "./validate-state.js";

/** Maximum length of an idempotency key, in UTF-8 bytes. */
export const maxIdempotencyKeyBytes = 256;

/** Smallest and largest value of an int64 field. */
const minInt64 = -(2n ** 63n);
const maxInt64 = 2n ** 63n - 1n;

/** Check of one state field's value in `set`, keyed by the proto field name. */
type FieldRules<State> = Readonly<Record<string, (state: State, path: string) => void>>;

/** Rules for every field of ModelState, the same that validateState applies to a saved model. */
export const modelFieldRules: FieldRules<ModelState> = {
  status: (model, path) => validateEnum(model.status, ModelStatus, path),
  failure_count: (model, path) => validateCounter(model.failureCount, path),
  error_rate: (model, path) => validateFraction(model.errorRate, path),
  cooldown_remaining: (model, path) => validateNonNegative(model.cooldownRemaining, path),
  quota_used: (model, path) => validateCounter(model.quotaUsed, path),
  tokens_used: (model, path) => validateCounter(model.tokensUsed, path),
  cost_accumulated: (model, path) => validateNonNegative(model.costAccumulated, path),
  last_request: (model, path) => validateTimestamp(model.lastRequest, path),
  last_failure: (model, path) => validateTimestamp(model.lastFailure, path),
  deactivation_reason: (model, path) => validateEnum(model.deactivationReason, DeactivationReason, path),
  cooldown_until: (model, path) => validateTimestamp(model.cooldownUntil, path),
};

/** Rules for every field of ProviderState. */
export const providerFieldRules: FieldRules<ProviderState> = {
  available: () => {},
  auth_valid: () => {},
  last_probe: (provider, path) => validateTimestamp(provider.lastProbe, path),
  availability_score: (provider, path) => {
    if (provider.availabilityScore !== undefined) {
      validateFraction(provider.availabilityScore, path);
    }
  },
  active_model_count: (provider, path) => validateCounter(provider.activeModelCount, path),
  total_quota_used: (provider, path) => validateCounter(provider.totalQuotaUsed, path),
  total_cost: (provider, path) => validateNonNegative(provider.totalCost, path),
};

/** Rules for every field of PoolState. The limit on pool members is checked apart, over both lists. */
export const poolFieldRules: FieldRules<PoolState> = {
  active_models: (pool, path) => pool.activeModels.forEach((id, index) => validateId(id, `${path}[${index}]`)),
  standby_models: (pool, path) => pool.standbyModels.forEach((id, index) => validateId(id, `${path}[${index}]`)),
  rotation_count: (pool, path) => validateCounter(pool.rotationCount, path),
  last_rotation: (pool, path) => validateTimestamp(pool.lastRotation, path),
};

/**
 * Checks an UpdateState request before any of it applies. Throws
 * INVALID_ARGUMENT naming the first bad field, such as
 * `models[2].add.tokens_used`, for an empty request or a bad change, and
 * RESOURCE_EXHAUSTED when the request contains more than `maxChanges` changes.
 */
export function validateUpdateRequest(request: UpdateStateRequest, maxChanges: number): void {
  const changeCount = request.models.length + request.providers.length + request.pools.length;
  if (changeCount === 0) {
    throw invalidArgument("invalid request: it contains no changes, but needs at least one in models, providers or pools");
  }
  if (changeCount > maxChanges) {
    throw resourceExhausted(
      `cannot accept the update: it contains ${changeCount} changes, over the limit of ${maxChanges} per request (server.max_update_changes)`,
    );
  }
  validateIdempotencyKey(request.idempotencyKey);

  request.models.forEach((change, index) => validateChange(EntityKind.MODEL, change, `models[${index}]`));
  request.providers.forEach((change, index) => validateChange(EntityKind.PROVIDER, change, `providers[${index}]`));
  request.pools.forEach((change, index) => validateChange(EntityKind.POOL, change, `pools[${index}]`));
}

function validateIdempotencyKey(key: string): void {
  const bytes = Buffer.byteLength(key, "utf8");
  if (bytes > maxIdempotencyKeyBytes) {
    throw invalidArgument(
      `invalid idempotency_key: the key is ${bytes} bytes long, over the limit of ${maxIdempotencyKeyBytes}`,
    );
  }
  // Control characters are rejected as in ids, because they corrupt log lines.
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(key)) {
    throw invalidArgument("invalid idempotency_key: the key contains a control character");
  }
}

function validateChange(kind: EntityKind, change: EntityChangeMessage, path: string): void {
  validateId(change.id, `${path}.id`);
  if (change.remove) {
    validateRemoveAlone(change, path);
    return;
  }

  validateSetFields(kind, change, path);
  validateAmounts(kind, change, path);
  validateTimes(kind, change, path);
  if (!hasSomethingToChange(kind, change)) {
    const hint =
      change.set !== undefined
        ? "because set_fields names none of the fields of set"
        : "so name fields in set_fields, add a non-zero amount, give a time in keep_latest or set remove";
    throw invalidArgument(`invalid ${path}: the change has nothing to change, ${hint}`);
  }
}

function validateRemoveAlone(change: EntityChangeMessage, path: string): void {
  const otherParts = [
    change.set !== undefined ? "set" : undefined,
    change.setFields !== undefined ? "set_fields" : undefined,
    change.add !== undefined ? "add" : undefined,
    change.keepLatest !== undefined ? "keep_latest" : undefined,
  ].filter((part) => part !== undefined);
  if (otherParts.length > 0) {
    throw invalidArgument(`invalid ${path}: remove cannot be combined with ${otherParts.join(", ")}`);
  }
}

/** Checks that set_fields names top-level fields of the state, and the values in set of the fields it names. */
function validateSetFields(kind: EntityKind, change: EntityChangeMessage, path: string): void {
  const paths = change.setFields?.paths ?? [];
  if (paths.length === 0) {
    return;
  }

  const stateSchema = schemasOfKind(kind).state;
  for (const fieldPath of paths) {
    if (fieldNamed(stateSchema, fieldPath) === undefined) {
      throw invalidArgument(`invalid ${path}.set_fields: ${unknownFieldReason(stateSchema, fieldPath)}`);
    }
  }

  if (change.set === undefined) {
    // Every named field is cleared to its default, which is always valid.
    return;
  }
  for (const fieldPath of new Set(paths)) {
    validateSetValue(kind, change, fieldPath, `${path}.set.${fieldPath}`);
  }
  if (kind === EntityKind.POOL) {
    validatePoolMemberCount(change.set as PoolState, paths, `${path}.set`);
  }
}

function unknownFieldReason(stateSchema: DescMessage, fieldPath: string): string {
  const fieldNames = stateSchema.fields.map((field) => field.name).join(", ");
  const expected = fieldPath.includes(".") ? "expected a top-level field, one of" : "expected one of";
  return `unknown field "${fieldPath}" of ${stateSchema.name}, ${expected}: ${fieldNames}`;
}

function validateSetValue(kind: EntityKind, change: EntityChangeMessage, fieldName: string, path: string): void {
  switch (kind) {
    case EntityKind.MODEL:
      modelFieldRules[fieldName]?.(change.set as ModelState, path);
      return;
    case EntityKind.PROVIDER:
      providerFieldRules[fieldName]?.(change.set as ProviderState, path);
      return;
    case EntityKind.POOL:
      poolFieldRules[fieldName]?.(change.set as PoolState, path);
      return;
    default:
      throw new Error(`cannot validate entity kind ${kind}: expected model, provider or pool`);
  }
}

/**
 * Checks the member limit over the lists that set_fields names. Applying the
 * change checks the limit again over both lists of the resulting pool.
 */
function validatePoolMemberCount(pool: PoolState, paths: readonly string[], path: string): void {
  const memberCount =
    (paths.includes("active_models") ? pool.activeModels.length : 0) +
    (paths.includes("standby_models") ? pool.standbyModels.length : 0);
  if (memberCount > maxPoolMembers) {
    throw invalidArgument(`invalid ${path}: it lists ${memberCount} models, over the limit of ${maxPoolMembers}`);
  }
}

/** Checks that integer amounts fit int64 and that double amounts are finite. Negative amounts are allowed. */
function validateAmounts(kind: EntityKind, change: EntityChangeMessage, path: string): void {
  if (change.add === undefined) {
    return;
  }

  const countersSchema = schemasOfKind(kind).counters;
  const amounts = reflect(countersSchema, change.add);
  for (const field of countersSchema.fields) {
    const amount = amounts.get(field);
    const fieldPath = `${path}.add.${field.name}`;
    if (typeof amount === "bigint" && (amount < minInt64 || amount > maxInt64)) {
      throw invalidArgument(`invalid ${fieldPath}: ${amount} is outside the int64 range`);
    }
    if (typeof amount === "number" && !Number.isFinite(amount)) {
      throw invalidArgument(`invalid ${fieldPath}: expected a finite number, got ${amount}`);
    }
  }
}

function validateTimes(kind: EntityKind, change: EntityChangeMessage, path: string): void {
  if (change.keepLatest === undefined) {
    return;
  }

  const timesSchema = schemasOfKind(kind).times;
  const times = reflect(timesSchema, change.keepLatest);
  for (const field of timesSchema.fields) {
    validateTimestamp(timestampOf(times, field), `${path}.keep_latest.${field.name}`);
  }
}

/** Returns whether a change names a field to set, adds a non-zero amount or gives a time. */
function hasSomethingToChange(kind: EntityKind, change: EntityChangeMessage): boolean {
  if ((change.setFields?.paths.length ?? 0) > 0) {
    return true;
  }

  const schemas = schemasOfKind(kind);
  if (change.add !== undefined) {
    // A proto3 number field counts as set when it is not zero.
    const amounts = reflect(schemas.counters, change.add);
    if (schemas.counters.fields.some((field) => amounts.isSet(field))) {
      return true;
    }
  }
  if (change.keepLatest !== undefined) {
    const times = reflect(schemas.times, change.keepLatest);
    if (schemas.times.fields.some((field) => times.isSet(field))) {
      return true;
    }
  }
  return false;
}
