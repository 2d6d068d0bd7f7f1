import type { Timestamp } from "@bufbuild/protobuf/wkt";
import {
  DeactivationReason,
  ModelStatus,
  type ModelState,
  type PoolState,
  type ProviderState,
  type SystemState,
} from "../gen/modelmesh/state/v1/state_pb.js";
import { invalidArgument, resourceExhausted } from "../server/service-error.js";
import { maxIdBytes, maxPoolMembers } from "./state-limits.js";

/** Seconds of 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the range of google.protobuf.Timestamp. */
const minTimestampSeconds = -62_135_596_800n;
const maxTimestampSeconds = 253_402_300_799n;

/**
 * Checks a whole state before anything of it is stored. Throws INVALID_ARGUMENT
 * naming the first bad field (such as `state.models["gpt-4o"].failure_count`),
 * or RESOURCE_EXHAUSTED when the state contains more than `maxEntities` entities.
 */
export function validateState(state: SystemState, maxEntities: number, path = "state"): void {
  const entityCount =
    Object.keys(state.models).length + Object.keys(state.providers).length + Object.keys(state.pools).length;
  if (entityCount > maxEntities) {
    throw resourceExhausted(
      `cannot accept ${path}: it contains ${entityCount} models, providers and pools, over the limit of ${maxEntities} ` +
        `(server.max_state_entities)`,
    );
  }
  for (const [id, model] of Object.entries(state.models)) {
    validateModel(model, `${path}.models[${JSON.stringify(id)}]`, id);
  }
  for (const [id, provider] of Object.entries(state.providers)) {
    validateProvider(provider, `${path}.providers[${JSON.stringify(id)}]`, id);
  }
  for (const [id, pool] of Object.entries(state.pools)) {
    validatePool(pool, `${path}.pools[${JSON.stringify(id)}]`, id);
  }
  validateTimestamp(state.timestamp, `${path}.timestamp`);
}

function validateModel(model: ModelState, path: string, id: string): void {
  validateId(id, path);
  validateEnum(model.status, ModelStatus, `${path}.status`);
  validateCounter(model.failureCount, `${path}.failure_count`);
  validateFraction(model.errorRate, `${path}.error_rate`);
  validateNonNegative(model.cooldownRemaining, `${path}.cooldown_remaining`);
  validateCounter(model.quotaUsed, `${path}.quota_used`);
  validateCounter(model.tokensUsed, `${path}.tokens_used`);
  validateNonNegative(model.costAccumulated, `${path}.cost_accumulated`);
  validateTimestamp(model.lastRequest, `${path}.last_request`);
  validateTimestamp(model.lastFailure, `${path}.last_failure`);
  validateTimestamp(model.cooldownUntil, `${path}.cooldown_until`);
  validateEnum(model.deactivationReason, DeactivationReason, `${path}.deactivation_reason`);
}

function validateProvider(provider: ProviderState, path: string, id: string): void {
  validateId(id, path);
  validateTimestamp(provider.lastProbe, `${path}.last_probe`);
  if (provider.availabilityScore !== undefined) {
    validateFraction(provider.availabilityScore, `${path}.availability_score`);
  }
  validateCounter(provider.activeModelCount, `${path}.active_model_count`);
  validateCounter(provider.totalQuotaUsed, `${path}.total_quota_used`);
  validateNonNegative(provider.totalCost, `${path}.total_cost`);
}

function validatePool(pool: PoolState, path: string, id: string): void {
  validateId(id, path);
  const memberCount = pool.activeModels.length + pool.standbyModels.length;
  if (memberCount > maxPoolMembers) {
    throw invalidArgument(`invalid ${path}: it lists ${memberCount} models, over the limit of ${maxPoolMembers}`);
  }
  pool.activeModels.forEach((modelId, index) => validateId(modelId, `${path}.active_models[${index}]`));
  pool.standbyModels.forEach((modelId, index) => validateId(modelId, `${path}.standby_models[${index}]`));
  validateCounter(pool.rotationCount, `${path}.rotation_count`);
  validateTimestamp(pool.lastRotation, `${path}.last_rotation`);
}

/** Rejects ids that are empty, too long or contain control characters, which etcd keys and logs mishandle. */
export function validateId(id: string, path: string): void {
  if (id.length === 0) {
    throw invalidArgument(`invalid ${path}: the id is empty`);
  }
  const bytes = Buffer.byteLength(id, "utf8");
  if (bytes > maxIdBytes) {
    throw invalidArgument(`invalid ${path}: the id is ${bytes} bytes long, over the limit of ${maxIdBytes}`);
  }
  // Control characters are rejected: they corrupt log lines and etcdctl output.
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(id)) {
    throw invalidArgument(`invalid ${path}: the id contains a control character`);
  }
}

/** Rejects a negative counter. */
export function validateCounter(value: bigint, path: string): void {
  if (value < 0n) {
    throw invalidArgument(`invalid ${path}: counters cannot be negative, got ${value}`);
  }
}

/** Rejects a number that is negative, infinite or NaN. */
export function validateNonNegative(value: number, path: string): void {
  if (!Number.isFinite(value) || value < 0) {
    throw invalidArgument(`invalid ${path}: expected a finite number of at least 0, got ${value}`);
  }
}

/** Rejects a number outside 0 to 1, or NaN. */
export function validateFraction(value: number, path: string): void {
  if (!Number.isFinite(value) || value < 0 || value > 1) {
    throw invalidArgument(`invalid ${path}: expected a finite number from 0 to 1, got ${value}`);
  }
}

/** Rejects a number that is not a value of the TypeScript enum `enumObject`. */
export function validateEnum(value: number, enumObject: Record<string, string | number>, path: string): void {
  if (typeof enumObject[value] !== "string") {
    throw invalidArgument(`invalid ${path}: unknown enum value ${value}`);
  }
}

/** Rejects a timestamp outside the range of google.protobuf.Timestamp. An unset timestamp passes. */
export function validateTimestamp(timestamp: Timestamp | undefined, path: string): void {
  if (timestamp === undefined) return;
  if (timestamp.seconds < minTimestampSeconds || timestamp.seconds > maxTimestampSeconds) {
    throw invalidArgument(`invalid ${path}: seconds ${timestamp.seconds} is outside years 0001 to 9999`);
  }
  if (timestamp.nanos < 0 || timestamp.nanos > 999_999_999) {
    throw invalidArgument(`invalid ${path}: nanos ${timestamp.nanos} is outside 0 to 999999999`);
  }
}
