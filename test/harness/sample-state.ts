import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import {
  DeactivationReason,
  ModelStatus,
  SystemStateSchema,
  type SystemState,
} from "../../src/gen/modelmesh/state/v1/state_pb.js";

/** A value above 2^53, which a double cannot hold exactly. */
export const beyondDoublePrecision = 2n ** 60n + 7n;

export interface SampleOptions {
  models?: number;
  /** tokens_used of every model, so tests can tell two snapshots apart. */
  tokensUsed?: bigint;
  /** Text before each model's number in its id. Default "model-". */
  idPrefix?: string;
}

/** Maximum number of models in one pool, so that no pool exceeds the size etcd accepts for one value. */
const modelsPerPool = 5000;

/** Builds a state with `models` models, two providers, and pools of at most 5,000 models that list every model. */
export function sampleState(options: SampleOptions = {}): SystemState {
  const modelCount = options.models ?? 3;
  const init: MessageInitShape<typeof SystemStateSchema> = {
    models: {},
    providers: {
      openai: { available: true, authValid: true, availabilityScore: 0.75, activeModelCount: 2n, totalQuotaUsed: 10n },
      anthropic: { available: false, authValid: true, lastProbe: timestampFromDate(new Date("2026-11-30T08:00:00Z")) },
    },
    pools: {},
    timestamp: timestampFromDate(new Date("2026-12-01T12:00:00.123Z")),
  };
  for (let index = 0; index < modelCount; index++) {
    const poolId = `chat-${Math.floor(index / modelsPerPool)}`;
    const pool = (init.pools![poolId] ??= { activeModels: [], standbyModels: [], rotationCount: 4n });
    const id = `${options.idPrefix ?? "model-"}${String(index).padStart(6, "0")}`;
    const standby = index % 10 === 9;
    init.models![id] = {
      status: standby ? ModelStatus.STANDBY : ModelStatus.ACTIVE,
      failureCount: BigInt(index % 5),
      errorRate: (index % 100) / 100,
      cooldownRemaining: standby ? 30.5 : 0,
      quotaUsed: BigInt(index),
      tokensUsed: options.tokensUsed ?? beyondDoublePrecision,
      costAccumulated: index * 0.001,
      lastRequest: timestampFromDate(new Date(Date.UTC(2026, 11, 1, 0, 0, index % 60))),
      deactivationReason: standby ? DeactivationReason.ERROR_THRESHOLD : DeactivationReason.UNSPECIFIED,
    };
    (standby ? pool.standbyModels : pool.activeModels)!.push(id);
  }
  return create(SystemStateSchema, init);
}
