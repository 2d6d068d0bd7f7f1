import { clone, create, isFieldSet, type MessageInitShape } from "@bufbuild/protobuf";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { status } from "@grpc/grpc-js";
import { describe, expect, it } from "vitest";
import {
  EntityKind,
  ModelChangeSchema,
  PoolChangeSchema,
  ProviderChangeSchema,
} from "../../src/gen/modelmesh/state/v1/changes_pb.js";
import { UpdateStateRequestSchema } from "../../src/gen/modelmesh/state/v1/state_manager_service_pb.js";
import {
  DeactivationReason,
  ModelStateSchema,
  ModelStatus,
  PoolStateSchema,
  ProviderStateSchema,
  type ModelState,
  type PoolState,
  type ProviderState,
} from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { ServiceError } from "../../src/server/service-error.js";
import {
  applyEntityChange,
  changesOfRequest,
  entityValueEquals,
  mergeEntityChanges,
  removeEntityChange,
  replaceEntityChange,
  validateUpdateRequest,
} from "../../src/state/entity-changes.js";
import type { AnyEntityChange, EntityValue } from "../../src/state/entity.js";
import { maxPoolMembers } from "../../src/state/state-limits.js";
import { modelFieldRules, poolFieldRules, providerFieldRules } from "../../src/state/validate-changes.js";

type RequestInit = MessageInitShape<typeof UpdateStateRequestSchema>;
type ModelChangeInit = MessageInitShape<typeof ModelChangeSchema>;
type ProviderChangeInit = MessageInitShape<typeof ProviderChangeSchema>;
type PoolChangeInit = MessageInitShape<typeof PoolChangeSchema>;

const maxChanges = 100;

function at(seconds: number, nanos = 0): Timestamp {
  return { $typeName: "google.protobuf.Timestamp", seconds: BigInt(seconds), nanos };
}

function modelChange(init: ModelChangeInit): AnyEntityChange {
  return { kind: EntityKind.MODEL, change: create(ModelChangeSchema, init) };
}

function providerChange(init: ProviderChangeInit): AnyEntityChange {
  return { kind: EntityKind.PROVIDER, change: create(ProviderChangeSchema, init) };
}

function poolChange(init: PoolChangeInit): AnyEntityChange {
  return { kind: EntityKind.POOL, change: create(PoolChangeSchema, init) };
}

function model(init: MessageInitShape<typeof ModelStateSchema>): ModelState {
  return create(ModelStateSchema, init);
}

function provider(init: MessageInitShape<typeof ProviderStateSchema>): ProviderState {
  return create(ProviderStateSchema, init);
}

function pool(init: MessageInitShape<typeof PoolStateSchema>): PoolState {
  return create(PoolStateSchema, init);
}

/** Runs `action` and returns the ServiceError it throws, failing the test when it throws nothing or something else. */
function serviceErrorOf(action: () => unknown): ServiceError {
  try {
    action();
  } catch (error) {
    expect(error).toBeInstanceOf(ServiceError);
    return error as ServiceError;
  }
  throw new Error("expected a ServiceError, but nothing was thrown");
}

describe("validateUpdateRequest()", () => {
  const badRequests: Array<{ name: string; request: RequestInit; code: status; message: string }> = [
    {
      name: "empty request",
      request: {},
      code: status.INVALID_ARGUMENT,
      message: "invalid request: it contains no changes",
    },
    {
      name: "too many changes",
      request: {
        models: Array.from({ length: 60 }, (_, index) => ({ id: `m${index}`, remove: true })),
        pools: Array.from({ length: 41 }, (_, index) => ({ id: `p${index}`, remove: true })),
      },
      code: status.RESOURCE_EXHAUSTED,
      message: "it contains 101 changes, over the limit of 100",
    },
    {
      name: "empty model id",
      request: { models: [{ id: "a", remove: true }, { id: "", remove: true }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[1].id: the id is empty",
    },
    {
      name: "oversized provider id",
      request: { providers: [{ id: "p".repeat(513), remove: true }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid providers[0].id: the id is 513 bytes long, over the limit of 512",
    },
    {
      name: "control character in pool id",
      request: { pools: [{ id: "chat", remove: true }, { id: "chat\t2", remove: true }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid pools[1].id: the id contains a control character",
    },
    {
      name: "remove with set_fields",
      request: { models: [{ id: "m", remove: true, setFields: { paths: ["status"] } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0]: remove cannot be combined with set_fields",
    },
    {
      name: "remove with add",
      request: { providers: [{ id: "p", remove: true, add: { totalCost: 1 } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid providers[0]: remove cannot be combined with add",
    },
    {
      name: "remove with set",
      request: { pools: [{ id: "p", remove: true, set: {} }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid pools[0]: remove cannot be combined with set",
    },
    {
      name: "remove with keep_latest",
      request: { models: [{ id: "m", remove: true, keepLatest: { lastRequest: at(1) } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0]: remove cannot be combined with keep_latest",
    },
    {
      name: "unknown set_fields path",
      request: { providers: [{ id: "p", set: {}, setFields: { paths: ["available", "colour"] } }] },
      code: status.INVALID_ARGUMENT,
      message: 'invalid providers[0].set_fields: unknown field "colour" of ProviderState',
    },
    {
      name: "nested set_fields path",
      request: { models: [{ id: "m", set: {}, setFields: { paths: ["last_request.seconds"] } }] },
      code: status.INVALID_ARGUMENT,
      message: 'unknown field "last_request.seconds" of ModelState, expected a top-level field, one of: status,',
    },
    {
      name: "camel case set_fields path",
      request: { models: [{ id: "m", set: {}, setFields: { paths: ["tokensUsed"] } }] },
      code: status.INVALID_ARGUMENT,
      message: 'invalid models[0].set_fields: unknown field "tokensUsed" of ModelState',
    },
    {
      name: "empty set_fields path",
      request: { pools: [{ id: "p", setFields: { paths: [""] } }] },
      code: status.INVALID_ARGUMENT,
      message: 'invalid pools[0].set_fields: unknown field "" of PoolState',
    },
    {
      name: "negative counter in set",
      request: { models: [{ id: "m", set: { failureCount: -1n }, setFields: { paths: ["failure_count"] } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0].set.failure_count: counters cannot be negative, got -1",
    },
    {
      name: "error rate above 1 in set",
      request: { models: [{ id: "m", set: { errorRate: 1.5 }, setFields: { paths: ["error_rate"] } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0].set.error_rate: expected a finite number from 0 to 1, got 1.5",
    },
    {
      name: "NaN cost in set",
      request: {
        models: [{ id: "m", set: { costAccumulated: Number.NaN }, setFields: { paths: ["cost_accumulated"] } }],
      },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0].set.cost_accumulated: expected a finite number of at least 0, got NaN",
    },
    {
      name: "infinite cooldown in set",
      request: {
        models: [
          { id: "m", set: { cooldownRemaining: Number.POSITIVE_INFINITY }, setFields: { paths: ["cooldown_remaining"] } },
        ],
      },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0].set.cooldown_remaining",
    },
    {
      name: "unknown status in set",
      request: { models: [{ id: "m", set: { status: 99 as ModelStatus }, setFields: { paths: ["status"] } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0].set.status: unknown enum value 99",
    },
    {
      name: "unknown deactivation reason in set",
      request: {
        models: [
          {
            id: "m",
            set: { deactivationReason: 42 as DeactivationReason },
            setFields: { paths: ["deactivation_reason"] },
          },
        ],
      },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0].set.deactivation_reason: unknown enum value 42",
    },
    {
      name: "cooldown_until past year 9999 in set",
      request: {
        models: [{ id: "m", set: { cooldownUntil: at(253_402_300_800) }, setFields: { paths: ["cooldown_until"] } }],
      },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0].set.cooldown_until: seconds 253402300800 is outside years 0001 to 9999",
    },
    {
      name: "negative nanos in set",
      request: { models: [{ id: "m", set: { lastRequest: at(1, -1) }, setFields: { paths: ["last_request"] } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0].set.last_request: nanos -1 is outside 0 to 999999999",
    },
    {
      name: "availability score above 1 in set",
      request: { providers: [{ id: "p", set: { availabilityScore: 2 }, setFields: { paths: ["availability_score"] } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid providers[0].set.availability_score: expected a finite number from 0 to 1, got 2",
    },
    {
      name: "negative provider cost in set",
      request: { providers: [{ id: "p", set: { totalCost: -0.5 }, setFields: { paths: ["total_cost"] } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid providers[0].set.total_cost",
    },
    {
      name: "empty id in a pool list",
      request: { pools: [{ id: "chat", set: { activeModels: ["a", ""] }, setFields: { paths: ["active_models"] } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid pools[0].set.active_models[1]: the id is empty",
    },
    {
      name: "control character in a standby list",
      request: {
        pools: [{ id: "chat", set: { standbyModels: ["b\u007f"] }, setFields: { paths: ["standby_models"] } }],
      },
      code: status.INVALID_ARGUMENT,
      message: "invalid pools[0].set.standby_models[0]: the id contains a control character",
    },
    {
      name: "too many pool members",
      request: {
        pools: [
          {
            id: "chat",
            set: { activeModels: Array.from({ length: maxPoolMembers }, () => "a"), standbyModels: ["b"] },
            setFields: { paths: ["active_models", "standby_models"] },
          },
        ],
      },
      code: status.INVALID_ARGUMENT,
      message: `invalid pools[0].set: it lists ${maxPoolMembers + 1} models, over the limit of ${maxPoolMembers}`,
    },
    {
      name: "NaN cost amount",
      request: { models: [{ id: "m", add: { costAccumulated: Number.NaN } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0].add.cost_accumulated: expected a finite number, got NaN",
    },
    {
      name: "infinite provider cost amount",
      request: { providers: [{ id: "p", add: { totalCost: Number.NEGATIVE_INFINITY } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid providers[0].add.total_cost: expected a finite number, got -Infinity",
    },
    {
      name: "token amount outside int64",
      request: {
        models: [
          { id: "a", add: { tokensUsed: 1n } },
          { id: "b", add: { tokensUsed: 1n } },
          { id: "c", add: { tokensUsed: 2n ** 63n } },
        ],
      },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[2].add.tokens_used: 9223372036854775808 is outside the int64 range",
    },
    {
      name: "bad time in keep_latest",
      request: { models: [{ id: "m", keepLatest: { lastFailure: at(1, 1_000_000_000) } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0].keep_latest.last_failure: nanos 1000000000 is outside 0 to 999999999",
    },
    {
      name: "bad pool time in keep_latest",
      request: { pools: [{ id: "p", keepLatest: { lastRotation: at(-62_135_596_801) } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid pools[0].keep_latest.last_rotation",
    },
    {
      name: "change with only an id",
      request: { models: [{ id: "m" }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0]: the change has nothing to change",
    },
    {
      name: "change with zero amounts",
      request: { providers: [{ id: "p", add: { activeModelCount: 0n, totalQuotaUsed: 0n, totalCost: 0 } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid providers[0]: the change has nothing to change",
    },
    {
      name: "change with set but no set_fields",
      request: { models: [{ id: "m", set: { tokensUsed: 5n } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid models[0]: the change has nothing to change, because set_fields names none of the fields of set",
    },
    {
      name: "change with empty set_fields",
      request: { pools: [{ id: "p", setFields: { paths: [] } }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid pools[0]: the change has nothing to change",
    },
    {
      name: "change with empty keep_latest",
      request: { pools: [{ id: "p", keepLatest: {} }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid pools[0]: the change has nothing to change",
    },
    {
      name: "idempotency key over 256 bytes",
      request: { idempotencyKey: "k".repeat(257), models: [{ id: "m", remove: true }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid idempotency_key: the key is 257 bytes long, over the limit of 256",
    },
    {
      name: "idempotency key over 256 UTF-8 bytes",
      request: { idempotencyKey: "é".repeat(129), models: [{ id: "m", remove: true }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid idempotency_key: the key is 258 bytes long",
    },
    {
      name: "idempotency key with a newline",
      request: { idempotencyKey: "retry\n1", models: [{ id: "m", remove: true }] },
      code: status.INVALID_ARGUMENT,
      message: "invalid idempotency_key: the key contains a control character",
    },
  ];

  for (const { name, request, code, message } of badRequests) {
    it(`rejects ${name}`, () => {
      const error = serviceErrorOf(() => validateUpdateRequest(create(UpdateStateRequestSchema, request), maxChanges));

      expect(error.code).toBe(code);
      expect(error.message).toContain(message);
    });
  }

  const goodRequests: Array<{ name: string; request: RequestInit }> = [
    { name: "removal alone", request: { models: [{ id: "m", remove: true }] } },
    {
      name: "set with a mask",
      request: {
        models: [{ id: "m", set: { status: ModelStatus.STANDBY, cooldownUntil: at(100) }, setFields: { paths: ["status", "cooldown_until"] } }],
      },
    },
    { name: "set_fields without set", request: { providers: [{ id: "p", setFields: { paths: ["availability_score"] } }] } },
    { name: "negative amounts", request: { models: [{ id: "m", add: { tokensUsed: -5n, costAccumulated: -0.25 } }] } },
    { name: "keep_latest alone", request: { pools: [{ id: "p", keepLatest: { lastRotation: at(5) } }] } },
    {
      name: "bad value in a field not named",
      request: { models: [{ id: "m", set: { failureCount: -1n, errorRate: 0.5 }, setFields: { paths: ["error_rate"] } }] },
    },
    { name: "idempotency key of 256 bytes", request: { idempotencyKey: "k".repeat(256), pools: [{ id: "p", remove: true }] } },
    {
      name: "exactly the change limit",
      request: { providers: Array.from({ length: maxChanges }, (_, index) => ({ id: `p${index}`, remove: true })) },
    },
    {
      name: "pool lists at the member limit",
      request: {
        pools: [
          {
            id: "chat",
            set: { activeModels: Array.from({ length: maxPoolMembers }, () => "a") },
            setFields: { paths: ["active_models"] },
          },
        ],
      },
    },
  ];

  for (const { name, request } of goodRequests) {
    it(`accepts ${name}`, () => {
      expect(() => validateUpdateRequest(create(UpdateStateRequestSchema, request), maxChanges)).not.toThrow();
    });
  }

  it("has a rule for every state field", () => {
    expect(Object.keys(modelFieldRules).sort()).toEqual(ModelStateSchema.fields.map((field) => field.name).sort());
    expect(Object.keys(providerFieldRules).sort()).toEqual(ProviderStateSchema.fields.map((field) => field.name).sort());
    expect(Object.keys(poolFieldRules).sort()).toEqual(PoolStateSchema.fields.map((field) => field.name).sort());
  });
});

describe("changesOfRequest()", () => {
  it("lists models, providers, then pools in request order", () => {
    const request = create(UpdateStateRequestSchema, {
      pools: [{ id: "pool-1", remove: true }],
      providers: [{ id: "provider-1", remove: true }, { id: "provider-2", remove: true }],
      models: [{ id: "model-1", remove: true }, { id: "model-2", remove: true }],
    });

    const changes = changesOfRequest(request);

    expect(changes.map((entry) => [entry.kind, entry.change.id])).toEqual([
      [EntityKind.MODEL, "model-1"],
      [EntityKind.MODEL, "model-2"],
      [EntityKind.PROVIDER, "provider-1"],
      [EntityKind.PROVIDER, "provider-2"],
      [EntityKind.POOL, "pool-1"],
    ]);
    expect(changes[0]?.change).toBe(request.models[0]);
  });
});

describe("applyEntityChange()", () => {
  it("writes only the fields that set_fields names", () => {
    const stored = model({ status: ModelStatus.ACTIVE, tokensUsed: 5n, errorRate: 0.1 });
    const entry = modelChange({
      id: "m",
      set: { status: ModelStatus.STANDBY, tokensUsed: 999n, errorRate: 0.9 },
      setFields: { paths: ["status", "error_rate"] },
    });

    const result = applyEntityChange(entry, stored);

    expect(result).toEqual(model({ status: ModelStatus.STANDBY, tokensUsed: 5n, errorRate: 0.9 }));
  });

  it("clears a named message field unset in set", () => {
    const stored = model({ lastRequest: at(10), lastFailure: at(20) });
    const entry = modelChange({ id: "m", set: {}, setFields: { paths: ["last_request"] } });

    const result = applyEntityChange(entry, stored) as ModelState;

    expect(result.lastRequest).toBeUndefined();
    expect(result.lastFailure).toEqual(at(20));
  });

  it("clears an optional field when set is absent", () => {
    const stored = provider({ availabilityScore: 0.25, available: true });
    const entry = providerChange({ id: "p", setFields: { paths: ["availability_score", "available"] } });

    const result = applyEntityChange(entry, stored) as ProviderState;

    expect(isFieldSet(result, ProviderStateSchema.field.availabilityScore)).toBe(false);
    expect(result.available).toBe(false);
  });

  it("sets an optional field to zero", () => {
    const entry = providerChange({ id: "p", set: { availabilityScore: 0 }, setFields: { paths: ["availability_score"] } });

    const result = applyEntityChange(entry, provider({ availabilityScore: 0.5 })) as ProviderState;

    expect(isFieldSet(result, ProviderStateSchema.field.availabilityScore)).toBe(true);
    expect(result.availabilityScore).toBe(0);
  });

  it("replaces pool lists", () => {
    const stored = pool({ activeModels: ["a", "b"], standbyModels: ["c"] });
    const entry = poolChange({ id: "chat", set: { activeModels: ["b"], standbyModels: ["x"] }, setFields: { paths: ["active_models"] } });

    const result = applyEntityChange(entry, stored) as PoolState;

    expect(result.activeModels).toEqual(["b"]);
    expect(result.standbyModels).toEqual(["c"]);
  });

  it("adds int64 amounts exactly above 2^53", () => {
    const stored = model({ tokensUsed: 2n ** 53n + 1n, quotaUsed: 2n ** 62n });
    const entry = modelChange({ id: "m", add: { tokensUsed: 2n, quotaUsed: 2n ** 62n - 1n } });

    const result = applyEntityChange(entry, stored) as ModelState;

    expect(result.tokensUsed).toBe(9_007_199_254_740_995n);
    expect(result.quotaUsed).toBe(2n ** 63n - 1n);
  });

  it("adds double amounts", () => {
    const entry = providerChange({ id: "p", add: { totalCost: 0.25, activeModelCount: -1n } });

    const result = applyEntityChange(entry, provider({ totalCost: 1.5, activeModelCount: 3n })) as ProviderState;

    expect(result.totalCost).toBe(1.75);
    expect(result.activeModelCount).toBe(2n);
  });

  it("rejects a counter that would end below zero", () => {
    const entry = modelChange({ id: "gpt-4o", add: { tokensUsed: -5n } });

    const error = serviceErrorOf(() => applyEntityChange(entry, model({ tokensUsed: 2n })));

    expect(error.code).toBe(status.FAILED_PRECONDITION);
    expect(error.message).toBe('cannot update model "gpt-4o": tokens_used would become -3');
  });

  it("names the entity with entityLabel", () => {
    const entry = poolChange({ id: "chat", add: { rotationCount: -1n } });

    const error = serviceErrorOf(() => applyEntityChange(entry, undefined, "pool chat of fleet eu"));

    expect(error.code).toBe(status.FAILED_PRECONDITION);
    expect(error.message).toBe("cannot update pool chat of fleet eu: rotation_count would become -1");
  });

  it("rejects a cost that would end below zero", () => {
    const entry = modelChange({ id: "m", add: { costAccumulated: -1 } });

    const error = serviceErrorOf(() => applyEntityChange(entry, model({ costAccumulated: 0.5 })));

    expect(error.code).toBe(status.FAILED_PRECONDITION);
    expect(error.message).toContain("cost_accumulated would become -0.5");
  });

  it("ends a cost at zero after rounding error", () => {
    let value: EntityValue | undefined = model({ costAccumulated: 0.3 });
    for (const amount of [-0.1, -0.2]) {
      value = applyEntityChange(modelChange({ id: "m", add: { costAccumulated: amount } }), value);
    }

    expect((value as ModelState).costAccumulated).toBe(0);
  });

  it("rejects a counter past the int64 maximum", () => {
    const entry = modelChange({ id: "m", add: { failureCount: 1n } });

    const error = serviceErrorOf(() => applyEntityChange(entry, model({ failureCount: 2n ** 63n - 1n })));

    expect(error.code).toBe(status.FAILED_PRECONDITION);
    expect(error.message).toContain("failure_count would become 9223372036854775808, over the int64 maximum");
  });

  it("rejects a cost that would become infinite", () => {
    const entry = providerChange({ id: "p", add: { totalCost: Number.MAX_VALUE } });

    const error = serviceErrorOf(() => applyEntityChange(entry, provider({ totalCost: Number.MAX_VALUE })));

    expect(error.code).toBe(status.FAILED_PRECONDITION);
    expect(error.message).toContain("total_cost would become Infinity");
  });

  const keepLatestCases: Array<{ name: string; stored: Timestamp | undefined; given: Timestamp; expected: Timestamp }> = [
    { name: "later time replaces", stored: at(100), given: at(200), expected: at(200) },
    { name: "earlier time is ignored", stored: at(200), given: at(100), expected: at(200) },
    { name: "later nanos replace", stored: at(100, 5), given: at(100, 6), expected: at(100, 6) },
    { name: "earlier nanos are ignored", stored: at(100, 6), given: at(100, 5), expected: at(100, 6) },
    { name: "time fills an unset field", stored: undefined, given: at(1), expected: at(1) },
    { name: "time before 1970 fills an unset field", stored: undefined, given: at(-50), expected: at(-50) },
  ];

  for (const { name, stored, given, expected } of keepLatestCases) {
    it(`keep_latest: ${name}`, () => {
      const entry = modelChange({ id: "m", keepLatest: { cooldownUntil: given } });

      const result = applyEntityChange(entry, model(stored === undefined ? {} : { cooldownUntil: stored })) as ModelState;

      expect(result.cooldownUntil).toEqual(expected);
    });
  }

  it("keep_latest leaves other times alone", () => {
    const entry = modelChange({ id: "m", keepLatest: { lastFailure: at(9) } });

    const result = applyEntityChange(entry, model({ lastRequest: at(3) })) as ModelState;

    expect(result.lastRequest).toEqual(at(3));
    expect(result.lastFailure).toEqual(at(9));
    expect(result.cooldownUntil).toBeUndefined();
  });

  it("applies set, then add, then keep_latest", () => {
    const entry = modelChange({
      id: "m",
      set: { tokensUsed: 10n, lastRequest: at(50) },
      setFields: { paths: ["tokens_used", "last_request"] },
      add: { tokensUsed: 5n },
      keepLatest: { lastRequest: at(40) },
    });

    const result = applyEntityChange(entry, model({ tokensUsed: 1000n, lastRequest: at(10) })) as ModelState;

    expect(result.tokensUsed).toBe(15n);
    expect(result.lastRequest).toEqual(at(50));
  });

  it("removes a stored entity", () => {
    expect(applyEntityChange(modelChange({ id: "m", remove: true }), model({ tokensUsed: 1n }))).toBeUndefined();
  });

  it("removes an entity that is not stored", () => {
    expect(applyEntityChange(poolChange({ id: "p", remove: true }), undefined)).toBeUndefined();
  });

  it("starts a new model from defaults", () => {
    const result = applyEntityChange(modelChange({ id: "m", add: { tokensUsed: 5n } }), undefined);

    expect(result).toEqual(model({ tokensUsed: 5n }));
  });

  it("starts a new provider with availability_score unset", () => {
    const result = applyEntityChange(providerChange({ id: "p", add: { totalQuotaUsed: 1n } }), undefined) as ProviderState;

    expect(result.$typeName).toBe("modelmesh.state.v1.ProviderState");
    expect(isFieldSet(result, ProviderStateSchema.field.availabilityScore)).toBe(false);
    expect(result.totalQuotaUsed).toBe(1n);
  });

  it("starts a new pool from defaults", () => {
    const result = applyEntityChange(poolChange({ id: "p", keepLatest: { lastRotation: at(7) } }), undefined);

    expect(result).toEqual(pool({ lastRotation: at(7) }));
  });

  it("rejects a stored value of another kind", () => {
    expect(() => applyEntityChange(modelChange({ id: "m", add: { tokensUsed: 1n } }), pool({}))).toThrow(
      'cannot update model "m": the stored value is a modelmesh.state.v1.PoolState',
    );
  });

  it("rejects an unknown set_fields path", () => {
    const entry = modelChange({ id: "m", set: {}, setFields: { paths: ["colour"] } });

    const error = serviceErrorOf(() => applyEntityChange(entry, undefined));

    expect(error.code).toBe(status.INVALID_ARGUMENT);
    expect(error.message).toContain('set_fields names unknown field "colour" of ModelState');
  });

  it("leaves its inputs unchanged", () => {
    const stored = pool({ activeModels: ["a"], rotationCount: 3n, lastRotation: at(1) });
    const change = create(PoolChangeSchema, {
      id: "chat",
      set: { activeModels: ["b", "c"] },
      setFields: { paths: ["active_models"] },
      add: { rotationCount: 2n },
      keepLatest: { lastRotation: at(2) },
    });
    const storedBefore = clone(PoolStateSchema, stored);
    const changeBefore = clone(PoolChangeSchema, change);

    const result = applyEntityChange({ kind: EntityKind.POOL, change }, stored) as PoolState;
    result.activeModels.push("d");
    result.lastRotation!.seconds = 99n;

    expect(stored).toEqual(storedBefore);
    expect(change).toEqual(changeBefore);
    expect(result).not.toBe(stored);
  });
});

describe("mergeEntityChanges()", () => {
  it("adds our amounts onto concurrent additions", () => {
    const base = model({ tokensUsed: 10n, costAccumulated: 1 });
    const theirs = model({ tokensUsed: 15n, costAccumulated: 1.5 });
    const ours = [modelChange({ id: "m", add: { tokensUsed: 3n, costAccumulated: 0.25 } })];

    const result = mergeEntityChanges(EntityKind.MODEL, base, theirs, ours) as ModelState;

    expect(result.tokensUsed).toBe(18n);
    expect(result.costAccumulated).toBe(1.75);
  });

  it("keeps their newer set value", () => {
    const base = model({ errorRate: 0.1 });
    const theirs = model({ errorRate: 0.5 });
    const ours = [modelChange({ id: "m", set: { errorRate: 0.2 }, setFields: { paths: ["error_rate"] } })];

    const result = mergeEntityChanges(EntityKind.MODEL, base, theirs, ours) as ModelState;

    expect(result.errorRate).toBe(0.5);
  });

  it("writes our set where theirs is unchanged", () => {
    const base = model({ errorRate: 0.1, status: ModelStatus.ACTIVE });
    const theirs = model({ errorRate: 0.1, status: ModelStatus.STANDBY });
    const ours = [
      modelChange({
        id: "m",
        set: { errorRate: 0.2, status: ModelStatus.ACTIVE },
        setFields: { paths: ["error_rate", "status"] },
      }),
    ];

    const result = mergeEntityChanges(EntityKind.MODEL, base, theirs, ours) as ModelState;

    expect(result.errorRate).toBe(0.2);
    expect(result.status).toBe(ModelStatus.STANDBY);
  });

  it("compares an unset base with defaults", () => {
    const theirs = provider({ available: true, totalCost: 2 });
    const ours = [
      providerChange({
        id: "p",
        set: { available: false, authValid: true },
        setFields: { paths: ["available", "auth_valid"] },
        add: { totalCost: 1 },
      }),
    ];

    const result = mergeEntityChanges(EntityKind.PROVIDER, undefined, theirs, ours) as ProviderState;

    expect(result).toEqual(provider({ available: true, authValid: true, totalCost: 3 }));
  });

  it("takes the later time for keep_latest", () => {
    const base = pool({ lastRotation: at(10) });
    const theirs = pool({ lastRotation: at(30) });

    const earlier = mergeEntityChanges(EntityKind.POOL, base, theirs, [poolChange({ id: "p", keepLatest: { lastRotation: at(20) } })]);
    const later = mergeEntityChanges(EntityKind.POOL, base, theirs, [poolChange({ id: "p", keepLatest: { lastRotation: at(40) } })]);

    expect((earlier as PoolState).lastRotation).toEqual(at(30));
    expect((later as PoolState).lastRotation).toEqual(at(40));
  });

  it("removes when theirs equals base", () => {
    const base = model({ tokensUsed: 4n });

    const result = mergeEntityChanges(EntityKind.MODEL, base, clone(ModelStateSchema, base), [modelChange({ id: "m", remove: true })]);

    expect(result).toBeUndefined();
  });

  it("keeps their modified value over our removal", () => {
    const base = model({ tokensUsed: 4n });
    const theirs = model({ tokensUsed: 9n });

    const result = mergeEntityChanges(EntityKind.MODEL, base, theirs, [modelChange({ id: "m", remove: true })]);

    expect(result).toEqual(theirs);
  });

  it("applies changes after a skipped removal to theirs", () => {
    const base = pool({ rotationCount: 1n });
    const theirs = pool({ rotationCount: 2n, activeModels: ["a"] });
    const ours = [poolChange({ id: "p", remove: true }), poolChange({ id: "p", add: { rotationCount: 1n } })];

    const result = mergeEntityChanges(EntityKind.POOL, base, theirs, ours);

    expect(result).toEqual(pool({ rotationCount: 3n, activeModels: ["a"] }));
  });

  it("brings back an entity they removed", () => {
    const base = model({ tokensUsed: 4n, errorRate: 0.3 });
    const ours = [
      modelChange({ id: "m", add: { tokensUsed: 2n } }),
      modelChange({ id: "m", set: { status: ModelStatus.STANDBY }, setFields: { paths: ["status"] } }),
    ];

    const result = mergeEntityChanges(EntityKind.MODEL, base, undefined, ours);

    expect(result).toEqual(model({ tokensUsed: 2n, status: ModelStatus.STANDBY }));
  });

  it("keeps an entity removed by both", () => {
    const result = mergeEntityChanges(EntityKind.PROVIDER, provider({ available: true }), undefined, [
      providerChange({ id: "p", remove: true }),
    ]);

    expect(result).toBeUndefined();
  });

  it("clamps a counter at zero instead of failing", () => {
    const base = model({ tokensUsed: 10n });
    const theirs = model({ tokensUsed: 2n });

    const result = mergeEntityChanges(EntityKind.MODEL, base, theirs, [modelChange({ id: "m", add: { tokensUsed: -5n } })]);

    expect((result as ModelState).tokensUsed).toBe(0n);
  });

  it("rejects a change of another kind", () => {
    expect(() => mergeEntityChanges(EntityKind.POOL, undefined, undefined, [modelChange({ id: "m", remove: true })])).toThrow(
      "cannot merge a model change into a pool: the kinds differ",
    );
  });

  it("leaves its inputs unchanged", () => {
    const base = model({ tokensUsed: 1n, lastRequest: at(1) });
    const theirs = model({ tokensUsed: 3n, lastRequest: at(2) });
    const changes = [
      create(ModelChangeSchema, { id: "m", add: { tokensUsed: 1n }, keepLatest: { lastRequest: at(5) } }),
      create(ModelChangeSchema, { id: "m", set: { errorRate: 0.5 }, setFields: { paths: ["error_rate"] } }),
    ];
    const baseBefore = clone(ModelStateSchema, base);
    const theirsBefore = clone(ModelStateSchema, theirs);
    const changesBefore = changes.map((change) => clone(ModelChangeSchema, change));

    const result = mergeEntityChanges(
      EntityKind.MODEL,
      base,
      theirs,
      changes.map((change): AnyEntityChange => ({ kind: EntityKind.MODEL, change })),
    ) as ModelState;
    result.lastRequest!.seconds = 99n;

    expect(base).toEqual(baseBefore);
    expect(theirs).toEqual(theirsBefore);
    expect(changes).toEqual(changesBefore);
  });

  it("equals applying in order when base equals theirs", () => {
    const random = seededRandom(20_261_201);
    let compared = 0;
    for (let round = 0; round < 300; round++) {
      const kind = [EntityKind.MODEL, EntityKind.PROVIDER, EntityKind.POOL][round % 3]!;
      const base = random() < 0.2 ? undefined : randomValue(kind, random);
      const ours = Array.from({ length: 1 + Math.floor(random() * 4) }, () => randomChange(kind, random));

      let expected: EntityValue | undefined;
      try {
        expected = ours.reduce<EntityValue | undefined>((value, entry) => applyEntityChange(entry, value), base);
      } catch {
        // A counter would end below zero, so these changes could not have been accepted.
        continue;
      }
      const theirs = base === undefined ? undefined : copyValue(kind, base);
      const merged = mergeEntityChanges(kind, base, theirs, ours);

      expect(entityValueEquals(kind, merged, expected), `round ${round}`).toBe(true);
      compared++;
    }

    expect(compared).toBeGreaterThan(150);
  });
});

describe("replaceEntityChange()", () => {
  const values: Array<{ kind: EntityKind; value: EntityValue; stored: EntityValue }> = [
    {
      kind: EntityKind.MODEL,
      value: model({ status: ModelStatus.STANDBY, deactivationReason: DeactivationReason.MANUAL, cooldownUntil: at(9) }),
      stored: model({ tokensUsed: 7n, lastRequest: at(3), cooldownUntil: at(20) }),
    },
    {
      kind: EntityKind.PROVIDER,
      value: provider({ available: true, totalCost: 2 }),
      stored: provider({ availabilityScore: 0.3, lastProbe: at(4) }),
    },
    {
      kind: EntityKind.POOL,
      value: pool({ activeModels: ["a"], rotationCount: 1n }),
      stored: pool({ standbyModels: ["b"], lastRotation: at(5) }),
    },
  ];

  for (const { kind, value, stored } of values) {
    it(`replaces every field of kind ${EntityKind[kind]}`, () => {
      const entry = replaceEntityChange(kind, "x", value);

      expect(entityValueEquals(kind, applyEntityChange(entry, stored), value)).toBe(true);
      expect(entityValueEquals(kind, applyEntityChange(entry, undefined), value)).toBe(true);
    });
  }

  it("passes validation", () => {
    const entry = replaceEntityChange(EntityKind.MODEL, "m", values[0]!.value);
    const request = create(UpdateStateRequestSchema, entry.kind === EntityKind.MODEL ? { models: [entry.change] } : {});

    expect(() => validateUpdateRequest(request, maxChanges)).not.toThrow();
  });

  it("copies the value", () => {
    const value = pool({ activeModels: ["a"] });

    const entry = replaceEntityChange(EntityKind.POOL, "p", value);
    value.activeModels.push("b");

    expect((entry.change.set as PoolState).activeModels).toEqual(["a"]);
  });

  it("rejects a value of another kind", () => {
    expect(() => replaceEntityChange(EntityKind.PROVIDER, "p", model({}))).toThrow(
      'cannot replace provider "p": the value is a modelmesh.state.v1.ModelState',
    );
  });
});

describe("removeEntityChange()", () => {
  it("builds a removal of each kind", () => {
    for (const kind of [EntityKind.MODEL, EntityKind.PROVIDER, EntityKind.POOL]) {
      const entry = removeEntityChange(kind, "x");

      expect(entry.kind).toBe(kind);
      expect(entry.change.id).toBe("x");
      expect(entry.change.remove).toBe(true);
    }
  });
});

describe("entityValueEquals()", () => {
  it("compares values and absence", () => {
    expect(entityValueEquals(EntityKind.MODEL, undefined, undefined)).toBe(true);
    expect(entityValueEquals(EntityKind.MODEL, undefined, model({}))).toBe(false);
    expect(entityValueEquals(EntityKind.MODEL, model({ tokensUsed: 1n }), model({ tokensUsed: 1n }))).toBe(true);
    expect(entityValueEquals(EntityKind.MODEL, model({ tokensUsed: 1n }), model({ tokensUsed: 2n }))).toBe(false);
    expect(entityValueEquals(EntityKind.PROVIDER, provider({}), provider({ availabilityScore: 1 }))).toBe(false);
  });
});

/** Returns a deterministic generator of numbers in [0, 1) (mulberry32), so that a failing round can be rerun. */
function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let mixed = state;
    mixed = Math.imul(mixed ^ (mixed >>> 15), mixed | 1);
    mixed ^= mixed + Math.imul(mixed ^ (mixed >>> 7), mixed | 61);
    return ((mixed ^ (mixed >>> 14)) >>> 0) / 4_294_967_296;
  };
}

function randomInt(random: () => number, below: number): number {
  return Math.floor(random() * below);
}

function randomTime(random: () => number): Timestamp | undefined {
  return random() < 0.3 ? undefined : at(1_700_000_000 + randomInt(random, 1000), randomInt(random, 3) * 100);
}

function randomValue(kind: EntityKind, random: () => number): EntityValue {
  switch (kind) {
    case EntityKind.MODEL:
      return model({
        status: randomInt(random, 3) as ModelStatus,
        failureCount: BigInt(randomInt(random, 5)),
        errorRate: randomInt(random, 5) / 4,
        tokensUsed: 2n ** 60n + BigInt(randomInt(random, 100)),
        costAccumulated: randomInt(random, 8) / 4,
        lastRequest: randomTime(random),
        cooldownUntil: randomTime(random),
        deactivationReason: randomInt(random, 8) as DeactivationReason,
      });
    case EntityKind.PROVIDER:
      return provider({
        available: random() < 0.5,
        lastProbe: randomTime(random),
        ...(random() < 0.5 ? { availabilityScore: randomInt(random, 5) / 4 } : {}),
        activeModelCount: BigInt(randomInt(random, 5)),
        totalCost: randomInt(random, 8) / 4,
      });
    default:
      return pool({
        activeModels: Array.from({ length: randomInt(random, 3) }, (_, index) => `m${index}`),
        standbyModels: random() < 0.5 ? ["s"] : [],
        rotationCount: BigInt(randomInt(random, 5)),
        lastRotation: randomTime(random),
      });
  }
}

function copyValue(kind: EntityKind, value: EntityValue): EntityValue {
  switch (kind) {
    case EntityKind.MODEL:
      return clone(ModelStateSchema, value as ModelState);
    case EntityKind.PROVIDER:
      return clone(ProviderStateSchema, value as ProviderState);
    default:
      return clone(PoolStateSchema, value as PoolState);
  }
}

/** Returns a random subset of the field names of a kind's state. */
function randomFieldNames(kind: EntityKind, random: () => number): string[] {
  let fields = PoolStateSchema.fields;
  if (kind === EntityKind.MODEL) {
    fields = ModelStateSchema.fields;
  } else if (kind === EntityKind.PROVIDER) {
    fields = ProviderStateSchema.fields;
  }
  return fields.map((field) => field.name).filter(() => random() < 0.3);
}

function randomChange(kind: EntityKind, random: () => number): AnyEntityChange {
  if (random() < 0.15) {
    return removeEntityChange(kind, "x");
  }

  const set = randomValue(kind, random);
  const setFields = { paths: randomFieldNames(kind, random) };
  const amount = (): bigint => BigInt(randomInt(random, 7) - 2);
  const cost = (): number => (randomInt(random, 7) - 2) / 4;
  switch (kind) {
    case EntityKind.MODEL:
      return modelChange({
        id: "x",
        set: set as ModelState,
        setFields,
        add: { failureCount: amount(), tokensUsed: amount(), costAccumulated: cost() },
        keepLatest: { lastRequest: randomTime(random), cooldownUntil: randomTime(random) },
      });
    case EntityKind.PROVIDER:
      return providerChange({
        id: "x",
        set: set as ProviderState,
        setFields,
        add: { activeModelCount: amount(), totalCost: cost() },
        keepLatest: { lastProbe: randomTime(random) },
      });
    default:
      return poolChange({
        id: "x",
        set: set as PoolState,
        setFields,
        add: { rotationCount: amount() },
        keepLatest: { lastRotation: randomTime(random) },
      });
  }
}
