import { create } from "@bufbuild/protobuf";
import { TimestampSchema, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { status as GrpcStatus } from "@grpc/grpc-js";
import { noop } from "cockatiel";
import { Etcd3 } from "etcd3";
import { pino, type Logger } from "pino";
import { afterAll, afterEach, beforeAll, describe, expect, inject, it } from "vitest";
import { EntityKind } from "../../src/gen/modelmesh/state/v1/changes_pb.js";
import {
  ModelStateSchema,
  ModelStatus,
  PoolStateSchema,
  ProviderStateSchema,
  SystemStateSchema,
  type ModelState,
  type SystemState,
} from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { ServiceError, failedPrecondition } from "../../src/server/service-error.js";
import type { EntityValue } from "../../src/state/entity.js";
import {
  EtcdChangeWriter,
  type CommitResult,
  type EntityWrite,
  type EtcdChangeWriterOptions,
  type WriteResult,
} from "../../src/storage/etcd-change-writer.js";
import { EtcdConnector } from "../../src/storage/etcd-connector.js";
import { captureLogger } from "../harness/captured-logger.js";
import { EtcdProcess } from "../harness/etcd.js";
import { SilentServer } from "../harness/silent-server.js";
import { uniquePrefix } from "../harness/in-process-daemon.js";

const silentLogger = pino({ level: "silent" });

/** Returns a write that adds `amount` to a model's tokens_used, creating the model when absent. */
function addTokens(id: string, amount: bigint): EntityWrite {
  return {
    kind: EntityKind.MODEL,
    id,
    compute: (stored) => {
      const model = stored === undefined ? create(ModelStateSchema) : (stored as ModelState);
      model.tokensUsed += amount;
      return model;
    },
  };
}

function tokensOf(value: EntityValue | undefined): bigint | undefined {
  return (value as ModelState | undefined)?.tokensUsed;
}

/** Builds a state of `count` models named `${namePrefix}${i}`, each with `tokensUsed` set to `tokens`. */
function modelsState(count: number, namePrefix: string, tokens: bigint): SystemState {
  const state = create(SystemStateSchema);
  for (let i = 0; i < count; i++) {
    state.models[`${namePrefix}${i}`] = create(ModelStateSchema, { status: ModelStatus.ACTIVE, tokensUsed: tokens });
  }
  return state;
}

/** Replay bytes that name the revision and the tokens of each value, so a test can tell two results apart. */
function encodeTokens(result: CommitResult): Uint8Array {
  return new TextEncoder().encode(`revision ${result.revision} tokens ${result.values.map(tokensOf).join(",")}`);
}

async function expectServiceError(promise: Promise<unknown>, code: GrpcStatus): Promise<ServiceError> {
  const error: unknown = await promise.then(
    () => undefined,
    (rejection: unknown) => rejection,
  );
  expect(error).toBeInstanceOf(ServiceError);
  expect((error as ServiceError).code).toBe(code);
  return error as ServiceError;
}

/** Returns the text of a replay's bytes, failing the test when the result was applied rather than replayed. */
function replayText(result: WriteResult): string {
  if (!result.replayed) throw new Error(`expected a replayed result, got one applied at revision ${result.revision}`);
  return new TextDecoder().decode(result.replay);
}

function expectApplied(result: WriteResult): asserts result is WriteResult & { replayed: false } {
  expect(result.replayed).toBe(false);
}

async function sleep(ms: number): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, ms));
}

describe("EtcdChangeWriter on the shared etcd", () => {
  const endpoint = inject("etcdEndpoint");
  const raw = new Etcd3({ hosts: endpoint });
  const connectors: EtcdConnector[] = [];
  const writers: EtcdChangeWriter[] = [];

  async function openConnector(prefix: string): Promise<EtcdConnector> {
    const connector = await EtcdConnector.open({ endpoints: [endpoint], prefix, requestTimeoutMs: 5000 }, silentLogger);
    connectors.push(connector);
    return connector;
  }

  /** Opens a connector of its own for the writer, as a separate daemon would. */
  async function openWriter(
    prefix: string,
    extra: Partial<EtcdChangeWriterOptions> = {},
    logger: Logger = silentLogger,
  ): Promise<{ writer: EtcdChangeWriter; connector: EtcdConnector }> {
    const connector = await openConnector(prefix);
    const writer = new EtcdChangeWriter(
      { client: connector.etcdClient, prefix, endpoints: [endpoint], requestTimeoutMs: 5000, ...extra },
      logger,
    );
    writers.push(writer);
    return { writer, connector };
  }

  async function keysUnder(prefix: string): Promise<string[]> {
    return await raw.getAll().prefix(prefix).keys();
  }

  async function currentGeneration(prefix: string): Promise<string> {
    const pointer = (await raw.get(`${prefix}/current`).json()) as { generation: string } | null;
    expect(pointer).not.toBeNull();
    return pointer!.generation;
  }

  afterEach(async () => {
    await Promise.all(writers.splice(0).map((writer) => writer.close()));
    await Promise.all(connectors.splice(0).map((connector) => connector.close()));
  });

  afterAll(() => {
    raw.close();
  });

  it("small write commits atomically, load sees it", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);
    const seed = modelsState(2, "model-", 10n);
    seed.timestamp = timestampFromDate(new Date("2026-01-01T00:00:00Z"));
    await connector.save(seed);
    const generation = await currentGeneration(prefix);

    const result = await writer.write({
      writes: [
        addTokens("model-0", 5n),
        { kind: EntityKind.MODEL, id: "model-1", compute: () => undefined },
        { kind: EntityKind.PROVIDER, id: "openai", compute: () => create(ProviderStateSchema, { available: true }) },
      ],
    });

    expectApplied(result);
    expect(tokensOf(result.values[0])).toBe(15n);
    expect(result.values[1]).toBeUndefined();
    const loaded = await connector.load();
    expect(Object.keys(loaded!.models)).toEqual(["model-0"]);
    expect(loaded!.models["model-0"]!.tokensUsed).toBe(15n);
    expect(loaded!.providers["openai"]!.available).toBe(true);
    expect(loaded!.timestamp).toEqual(seed.timestamp);
    // Every key the request changed carries the revision of its one transaction.
    const changed = await raw.kv.txn({
      success: ["models/model-0", "providers/openai", "last-change"].map((key) => ({
        request_range: { key: Buffer.from(`${prefix}/generations/${generation}/${key}`) },
      })),
    });
    const revisions = changed.responses.map((entry) => entry.response_range.kvs[0]?.mod_revision);
    expect(revisions).toEqual([String(result.revision), String(result.revision), String(result.revision)]);
    expect(await keysUnder(`${prefix}/generations/${generation}/models/`)).toEqual([
      `${prefix}/generations/${generation}/models/model-0`,
    ]);
  });

  it("first write creates the state", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);

    const result = await writer.write({ writes: [addTokens("fresh", 3n)] });

    expectApplied(result);
    const loaded = await connector.load();
    expect(Object.keys(loaded!.models)).toEqual(["fresh"]);
    expect(loaded!.models["fresh"]!.tokensUsed).toBe(3n);
    expect(await keysUnder(`${prefix}/staging`)).toEqual([]);
  });

  it("timestamp is stored in current", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);
    const created = timestampFromDate(new Date("2026-12-01T12:00:00.123Z"));
    const updated = timestampFromDate(new Date("2026-12-02T08:30:00Z"));
    const rewritten = timestampFromDate(new Date("2026-12-03T00:00:00Z"));
    const invalid = create(TimestampSchema, { seconds: 1n, nanos: 2_000_000_000 });

    await writer.write({ writes: [addTokens("model", 1n)], timestamp: created });
    const afterCreate = await connector.load();
    const [rejected, applied] = await Promise.allSettled([
      writer.write({ writes: [addTokens("model", 10n)], timestamp: invalid }),
      writer.write({ writes: [addTokens("model", 1n)], timestamp: updated }),
    ]);
    const afterUpdate = await connector.load();
    await writer.write({ writes: Array.from({ length: 200 }, (_, i) => addTokens(`model-${i}`, 1n)), timestamp: rewritten });
    const afterRewrite = await connector.load();

    expect(afterCreate!.timestamp).toEqual(created);
    expect(rejected.status).toBe("rejected");
    expect(((rejected as PromiseRejectedResult).reason as ServiceError).code).toBe(GrpcStatus.INVALID_ARGUMENT);
    expect(applied.status).toBe("fulfilled");
    expect(afterUpdate!.timestamp).toEqual(updated);
    expect(afterUpdate!.models["model"]!.tokensUsed).toBe(2n);
    expect(afterRewrite!.timestamp).toEqual(rewritten);
    expect(afterRewrite!.models["model"]!.tokensUsed).toBe(2n);
    expect(writer.stats.rewrites).toBe(1);
  });

  it("three writers, 150 concurrent increments", async () => {
    const prefix = uniquePrefix("change-writer");
    const daemons = [await openWriter(prefix), await openWriter(prefix), await openWriter(prefix)];
    const seed = create(SystemStateSchema, { models: { big: create(ModelStateSchema, { tokensUsed: 2n ** 60n + 1n }) } });
    await daemons[0]!.connector.save(seed);

    // Random starts spread the writes over many groups, so the three writers' commits collide.
    const increments = daemons.flatMap(({ writer }) =>
      Array.from({ length: 50 }, async () => {
        await sleep(Math.random() * 30);
        return await writer.write({ writes: [addTokens("counter", 1n), addTokens("big", 1n)] });
      }),
    );
    const results = await Promise.all(increments);

    const loaded = await daemons[1]!.connector.load();
    expect(loaded!.models["counter"]!.tokensUsed).toBe(150n);
    expect(loaded!.models["big"]!.tokensUsed).toBe(2n ** 60n + 151n);
    const seenCounters = results.map((result) => tokensOf(result.values[0])).sort((a, b) => Number(a! - b!));
    expect(seenCounters).toEqual(Array.from({ length: 150 }, (_, i) => BigInt(i + 1)));
    const stats = daemons.map(({ writer }) => writer.stats);
    console.log(
      "3 writers x 50 increments: " +
        stats.map((entry) => `${entry.commits} commits, ${entry.conflicts} conflicts`).join("; "),
    );
  });

  it("group commit takes few transactions", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);
    await connector.save(modelsState(10, "m-", 0n));

    const burst = await Promise.all(
      Array.from({ length: 200 }, (_, i) => writer.write({ writes: [addTokens(`m-${i % 10}`, 1n)] })),
    );
    const afterBurst = writer.stats;
    const spread = await Promise.all(
      Array.from({ length: 200 }, async (_, i) => {
        await sleep(Math.random() * 50);
        return await writer.write({ writes: [addTokens(`m-${i % 10}`, 1n)] });
      }),
    );
    const afterSpread = writer.stats;
    console.log(
      `200 writes at once: ${afterBurst.transactions} commit and ${afterBurst.reads} read transactions; ` +
        `200 writes over 50 ms: ${afterSpread.transactions - afterBurst.transactions} commit and ` +
        `${afterSpread.reads - afterBurst.reads} read transactions`,
    );

    expect(burst.every((result) => !result.replayed)).toBe(true);
    expect(spread.every((result) => !result.replayed)).toBe(true);
    expect(afterBurst.requestsCommitted).toBe(200);
    expect(afterSpread.requestsCommitted).toBe(400);
    expect(afterBurst.transactions).toBeLessThan(10);
    expect(afterSpread.transactions - afterBurst.transactions).toBeLessThan(100);
    const loaded = await connector.load();
    for (let i = 0; i < 10; i++) expect(loaded!.models[`m-${i}`]!.tokensUsed).toBe(40n);
  });

  it("idempotency key applies once, sequentially", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);

    const first = await writer.write({ writes: [addTokens("model", 7n)], idempotencyKey: "request-1", encodeReplay: encodeTokens });
    const second = await writer.write({ writes: [addTokens("model", 7n)], idempotencyKey: "request-1", encodeReplay: encodeTokens });

    expectApplied(first);
    expect(second.replayed).toBe(true);
    expect(second.revision).toBe(first.revision);
    expect(tokensOf(second.values[0])).toBe(7n);
    expect(replayText(second)).toBe(`revision ${first.revision} tokens 7`);
    expect((await connector.load())!.models["model"]!.tokensUsed).toBe(7n);
    const records = await raw.kv.range({
      key: Buffer.from(`${prefix}/idempotency/`),
      range_end: Buffer.from(`${prefix}/idempotency0`),
    });
    expect(records.kvs).toHaveLength(1);
    expect(records.kvs[0]!.key.toString()).toMatch(/\/idempotency\/[0-9a-f]{64}$/);
    expect(records.kvs[0]!.lease).not.toBe("0");
  });

  it("idempotency key applies once, concurrently", async () => {
    const prefix = uniquePrefix("change-writer");
    const first = await openWriter(prefix);
    const second = await openWriter(prefix);

    const results = await Promise.all(
      [first.writer, second.writer].flatMap((writer) =>
        Array.from({ length: 5 }, () =>
          writer.write({ writes: [addTokens("model", 3n)], idempotencyKey: "request-2", encodeReplay: encodeTokens }),
        ),
      ),
    );

    const applied = results.filter((result) => !result.replayed);
    expect(applied).toHaveLength(1);
    const expected = `revision ${applied[0]!.revision} tokens 3`;
    for (const result of results.filter((entry) => entry.replayed)) {
      expect(result.revision).toBe(applied[0]!.revision);
      expect(replayText(result)).toBe(expected);
    }
    expect((await first.connector.load())!.models["model"]!.tokensUsed).toBe(3n);
  });

  it("idempotency key reused for other entities", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer } = await openWriter(prefix);
    await writer.write({ writes: [addTokens("a", 1n)], idempotencyKey: "request-3" });

    const error = await expectServiceError(
      writer.write({ writes: [addTokens("b", 1n)], idempotencyKey: "request-3" }),
      GrpcStatus.INVALID_ARGUMENT,
    );

    expect(error.message).toBe(
      'cannot apply the request with idempotency key "request-3": an earlier request with this key changed other entities; ' +
        "use a new key for a different request",
    );
  });

  it("idempotency record expires with its lease", async () => {
    const prefix = uniquePrefix("change-writer");
    // A 1 s TTL gives a lease of 2 s: the TTL plus one rotation period of min(1 h, TTL).
    const { writer, connector } = await openWriter(prefix, { idempotencyTtlMs: 1000 });
    await writer.write({ writes: [addTokens("model", 1n)], idempotencyKey: "request-4" });

    const startedAt = Date.now();
    while ((await keysUnder(`${prefix}/idempotency/`)).length > 0) {
      expect(Date.now() - startedAt).toBeLessThan(10_000);
      await sleep(200);
    }
    const again = await writer.write({ writes: [addTokens("model", 1n)], idempotencyKey: "request-4" });

    expect(again.replayed).toBe(false);
    expect((await connector.load())!.models["model"]!.tokensUsed).toBe(2n);
  });

  it("failed compute fails only its request", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);
    await connector.save(modelsState(1, "model-", 0n));
    const rejecting: EntityWrite = {
      kind: EntityKind.MODEL,
      id: "model-0",
      compute: () => {
        throw failedPrecondition('cannot update model "model-0": quota exhausted');
      },
    };

    const settled = await Promise.allSettled([
      writer.write({ writes: [addTokens("model-0", 1n)] }),
      writer.write({ writes: [addTokens("other", 100n), rejecting] }),
      writer.write({ writes: [addTokens("model-0", 1n)] }),
    ]);

    expect(settled[0].status).toBe("fulfilled");
    expect(settled[2].status).toBe("fulfilled");
    const revisions = settled.map((entry) => (entry.status === "fulfilled" ? entry.value.revision : undefined));
    expect(revisions[0]).toBe(revisions[2]);
    expect(settled[1].status).toBe("rejected");
    const reason = (settled[1] as PromiseRejectedResult).reason as ServiceError;
    expect(reason.code).toBe(GrpcStatus.FAILED_PRECONDITION);
    expect(reason.message).toBe('cannot update model "model-0": quota exhausted');
    const loaded = await connector.load();
    expect(loaded!.models["model-0"]!.tokensUsed).toBe(2n);
    expect(loaded!.models["other"]).toBeUndefined();
  });

  it("stale fence rejects and writes nothing", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);
    const seed = modelsState(1, "model-", 0n);
    await connector.save(seed);
    const generation = await currentGeneration(prefix);
    const lockKey = `${prefix}-locks/fleet/holder`;
    const written = await raw.kv.put({ key: Buffer.from(lockKey), value: Buffer.from("holder") });
    const fence = { lockName: "fleet", token: BigInt(written.header.revision), etcdKey: lockKey, isCurrent: () => true };
    const fenced = await writer.write({ writes: [addTokens("model-0", 1n)], fence });
    expectApplied(fenced);
    // The grant ends and another holder queues under the same key, so its create revision differs.
    await raw.delete().key(lockKey);
    await raw.put(lockKey).value("next holder");

    const [stale, unfenced] = await Promise.allSettled([
      writer.write({ writes: [addTokens("model-0", 10n), addTokens("new", 1n)], fence, idempotencyKey: "fenced" }),
      writer.write({ writes: [addTokens("model-0", 100n)] }),
    ]);

    expect(stale.status).toBe("rejected");
    const error = (stale as PromiseRejectedResult).reason as ServiceError;
    expect(error.code).toBe(GrpcStatus.FAILED_PRECONDITION);
    expect(error.message).toBe(
      `cannot update state with fencing token ${fence.token}: lock "fleet" was released or expired before the commit`,
    );
    expect(unfenced.status).toBe("fulfilled");
    const loaded = await connector.load();
    expect(loaded!.models["model-0"]!.tokensUsed).toBe(101n);
    expect(loaded!.models["new"]).toBeUndefined();
    expect(await keysUnder(`${prefix}/idempotency/`)).toEqual([]);
    expect(await currentGeneration(prefix)).toBe(generation);
  });

  it("in-process fence that ended rejects", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);
    const fence = { lockName: "fleet", token: 7n, isCurrent: () => false };

    await expectServiceError(writer.write({ writes: [addTokens("model", 1n)], fence }), GrpcStatus.FAILED_PRECONDITION);

    expect(await connector.load()).toBeUndefined();
  });

  it("abort before commit rejects with the reason", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);
    const controller = new AbortController();
    const reason = new Error("client cancelled");

    const unaborted = writer.write({ writes: [addTokens("model", 1n)] });
    const aborted = writer.write({ writes: [addTokens("model", 10n)], signal: controller.signal });
    controller.abort(reason);
    const preAborted = writer.write({ writes: [addTokens("model", 100n)], signal: AbortSignal.abort(reason) });

    await expect(aborted).rejects.toBe(reason);
    await expect(preAborted).rejects.toBe(reason);
    expectApplied(await unaborted);
    expect((await connector.load())!.models["model"]!.tokensUsed).toBe(1n);
  });

  it("abort while the group reads rejects", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);
    await connector.save(modelsState(1, "model-", 0n));
    const controller = new AbortController();
    const reason = new Error("deadline passed");

    const unaborted = writer.write({ writes: [addTokens("model-0", 1n)] });
    const aborted = writer.write({ writes: [addTokens("model-0", 10n)], signal: controller.signal });
    // The writer forms its group on the turn of the event loop after the writes and then awaits its read,
    // so a callback queued now runs while both requests are in the group.
    let readsAtAbort = 0;
    setImmediate(() => {
      readsAtAbort = writer.stats.reads;
      controller.abort(reason);
    });

    await expect(aborted).rejects.toBe(reason);
    expectApplied(await unaborted);
    expect(readsAtAbort).toBe(1);
    expect((await connector.load())!.models["model-0"]!.tokensUsed).toBe(1n);
  });

  it("concurrent first writes create one generation", async () => {
    const prefix = uniquePrefix("change-writer");
    const first = await openWriter(prefix);
    const second = await openWriter(prefix);

    await Promise.all(
      [first.writer, second.writer].flatMap((writer) =>
        Array.from({ length: 10 }, async () => {
          await sleep(Math.random() * 10);
          return await writer.write({ writes: [addTokens("counter", 1n)] });
        }),
      ),
    );

    expect((await first.connector.load())!.models["counter"]!.tokensUsed).toBe(20n);
    const generation = await currentGeneration(prefix);
    const generationKeys = await keysUnder(`${prefix}/generations/`);
    expect(generationKeys.every((key) => key.startsWith(`${prefix}/generations/${generation}/`))).toBe(true);
  });

  it("revoked idempotency lease is replaced", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);
    await writer.write({ writes: [addTokens("model", 1n)], idempotencyKey: "before-revoke" });
    const [before] = (await raw.kv.range({ key: Buffer.from(`${prefix}/idempotency/`), range_end: Buffer.from(`${prefix}/idempotency0`) })).kvs;
    await raw.leaseClient.leaseRevoke({ ID: before!.lease });

    const result = await writer.write({ writes: [addTokens("model", 1n)], idempotencyKey: "after-revoke" });

    expectApplied(result);
    const [after] = (await raw.kv.range({ key: Buffer.from(`${prefix}/idempotency/`), range_end: Buffer.from(`${prefix}/idempotency0`) })).kvs;
    expect(after!.lease).not.toBe("0");
    expect(after!.lease).not.toBe(before!.lease);
    expect((await connector.load())!.models["model"]!.tokensUsed).toBe(2n);
  });

  it("close rejects queued writes", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer } = await openWriter(prefix);

    const queued = [writer.write({ writes: [addTokens("model", 1n)] }), writer.write({ writes: [addTokens("model", 1n)] })];
    const rejections = queued.map((pending) => expectServiceError(pending, GrpcStatus.UNAVAILABLE));
    await writer.close();

    await Promise.all(rejections);
    const late = await expectServiceError(writer.write({ writes: [addTokens("model", 1n)] }), GrpcStatus.UNAVAILABLE);
    expect(late.message).toBe(`cannot update state in etcd at ${endpoint}: the change writer is closed`);
  });

  it("large request is all or nothing", async () => {
    const prefix = uniquePrefix("change-writer");
    const { logger, lines } = captureLogger("debug");
    const { writer, connector } = await openWriter(prefix, {}, logger);
    const other = await openWriter(prefix);
    const reader = await openConnector(prefix);
    // 2,000 stored models make the copy take many transactions, so the small write lands before its commit.
    await connector.save(modelsState(2000, "model-", 0n));
    const oldGeneration = await currentGeneration(prefix);

    let smallWrite: Promise<WriteResult> | undefined;
    const writes = Array.from({ length: 500 }, (_, i) => addTokens(`model-${i}`, 1n));
    const firstWrite = writes[0]!;
    writes[0] = {
      ...firstWrite,
      compute: (stored) => {
        // Starts, once, a small write by another writer to the generation that this request is copying.
        smallWrite ??= other.writer.write({ writes: [addTokens("model-0", 1000n)] });
        return firstWrite.compute(stored);
      },
    };
    let done = false;
    const seen = { before: 0, after: 0 };
    const polling = (async () => {
      // Polling goes on until one load shows the committed rewrite.
      while (!done || seen.after === 0) {
        const loaded = await reader.load();
        const tokens = new Set(Array.from({ length: 499 }, (_, i) => loaded!.models[`model-${i + 1}`]!.tokensUsed));
        expect(tokens.size).toBe(1);
        if (tokens.has(0n)) seen.before++;
        else seen.after++;
      }
    })();
    const large = await writer.write({ writes }).finally(() => {
      done = true;
    });
    await polling;
    console.log(`reader during a 500-entity rewrite: ${seen.before} loads before, ${seen.after} after`);

    expectApplied(large);
    expectApplied(await smallWrite!);
    const loaded = await reader.load();
    expect(loaded!.models["model-0"]!.tokensUsed).toBe(1001n);
    for (let i = 1; i < 500; i++) expect(loaded!.models[`model-${i}`]!.tokensUsed).toBe(1n);
    expect(loaded!.models["model-500"]!.tokensUsed).toBe(0n);
    expect(Object.keys(loaded!.models)).toHaveLength(2000);
    expect(writer.stats.rewrites).toBe(1);
    expect(lines.filter((line) => line["msg"] === "generation changed during a rewrite, copying it again").length).toBeGreaterThan(0);
    const generation = await currentGeneration(prefix);
    expect(generation).not.toBe(oldGeneration);
    const generationKeys = await keysUnder(`${prefix}/generations/`);
    expect(generationKeys.every((key) => key.startsWith(`${prefix}/generations/${generation}/`))).toBe(true);
    expect(await keysUnder(`${prefix}/staging`)).toEqual([]);
  });

  it("group over the byte limit splits", async () => {
    const prefix = uniquePrefix("change-writer");
    const { logger, lines } = captureLogger("debug");
    const { writer, connector } = await openWriter(prefix, {}, logger);
    // 40,000 ids of about 11 bytes encode to about 480 KB, so two pools fill most of the 1 MiB a transaction may carry.
    const members = Array.from({ length: 40_000 }, (_, i) => `model-${i}`);
    const setPool = (id: string): EntityWrite => ({
      kind: EntityKind.POOL,
      id,
      compute: () => create(PoolStateSchema, { activeModels: members }),
    });

    const results = await Promise.all([
      writer.write({ writes: [setPool("a")] }),
      writer.write({ writes: [setPool("b")] }),
      writer.write({ writes: [setPool("c")] }),
      writer.write({ writes: [setPool("d"), setPool("e"), setPool("f")] }),
    ]);

    expect(results.every((result) => !result.replayed)).toBe(true);
    expect(writer.stats.commits).toBeGreaterThanOrEqual(2);
    expect(writer.stats.rewrites).toBe(1);
    expect(lines.some((line) => line["msg"]?.toString().startsWith("change requests deferred to a later transaction"))).toBe(true);
    const loaded = await connector.load();
    expect(Object.keys(loaded!.pools).sort()).toEqual(["a", "b", "c", "d", "e", "f"]);
    expect(loaded!.pools["f"]!.activeModels).toHaveLength(40_000);
  });

  it("oversized entity fails its request", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix, { maxEntityBytes: 10 });
    const big: EntityWrite = {
      kind: EntityKind.PROVIDER,
      id: "big",
      compute: () => create(ProviderStateSchema, { totalQuotaUsed: 2n ** 60n, totalCost: 1.5 }),
    };

    const [rejected, applied] = await Promise.allSettled([
      writer.write({ writes: [big] }),
      writer.write({ writes: [addTokens("small", 1n)] }),
    ]);

    expect(rejected.status).toBe("rejected");
    const error = (rejected as PromiseRejectedResult).reason as ServiceError;
    expect(error.code).toBe(GrpcStatus.RESOURCE_EXHAUSTED);
    expect(error.message).toMatch(/^cannot update provider "big": its encoded state is \d+ bytes, over the etcd limit of 10 bytes$/);
    expect(applied.status).toBe("fulfilled");
    expect(Object.keys((await connector.load())!.models)).toEqual(["small"]);
  });

  it("large request replays its idempotency key", async () => {
    const prefix = uniquePrefix("change-writer");
    const { writer, connector } = await openWriter(prefix);
    const writes = Array.from({ length: 300 }, (_, i) => addTokens(`model-${i}`, 2n));

    const first = await writer.write({ writes, idempotencyKey: "large-1", encodeReplay: encodeTokens });
    const second = await writer.write({ writes, idempotencyKey: "large-1", encodeReplay: encodeTokens });

    expectApplied(first);
    expect(second.replayed).toBe(true);
    expect(second.revision).toBe(first.revision);
    expect(replayText(second)).toBe(new TextDecoder().decode(encodeTokens(first)));
    const loaded = await connector.load();
    expect(Object.keys(loaded!.models)).toHaveLength(300);
    expect(loaded!.models["model-299"]!.tokensUsed).toBe(2n);
  });
});

// Tests that kill etcd run on a private etcd, so other test files never see it.
describe("EtcdChangeWriter on a private etcd", () => {
  let etcd: EtcdProcess;

  beforeAll(async () => {
    etcd = await EtcdProcess.start();
  });

  afterAll(async () => {
    await etcd.stop();
  });

  it("etcd down rejects with UNAVAILABLE", async () => {
    const prefix = uniquePrefix("change-writer");
    const connector = await EtcdConnector.open({ endpoints: [etcd.endpoint], prefix, requestTimeoutMs: 2000 }, silentLogger);
    const options = { client: connector.etcdClient, prefix, endpoints: [etcd.endpoint], requestTimeoutMs: 2000 };
    const warm = new EtcdChangeWriter(options, silentLogger);
    const cold = new EtcdChangeWriter(options, silentLogger);
    try {
      expectApplied(await warm.write({ writes: [addTokens("model", 1n)] }));

      await etcd.kill();
      let startedAt = Date.now();
      const warmError = await expectServiceError(warm.write({ writes: [addTokens("model", 1n)] }), GrpcStatus.UNAVAILABLE);
      const warmMs = Date.now() - startedAt;
      startedAt = Date.now();
      const coldError = await expectServiceError(cold.write({ writes: [addTokens("model", 1n)] }), GrpcStatus.UNAVAILABLE);
      const coldMs = Date.now() - startedAt;
      console.log(`etcd down: write rejected after ${warmMs} ms with a warm cache, ${coldMs} ms with a cold one`);

      expect(warmMs).toBeLessThan(5_000);
      expect(coldMs).toBeLessThan(5_000);
      expect(warmError.message).toContain(`cannot update state in etcd at ${etcd.endpoint}: `);
      expect(coldError.message).toContain(`cannot update state in etcd at ${etcd.endpoint}: reading the stored entities failed`);
    } finally {
      await warm.close();
      await cold.close();
      await connector.close();
    }
  });
});

describe("EtcdChangeWriter on a server that never responds", () => {
  const silentServer = new SilentServer();
  let endpoint: string;

  beforeAll(async () => {
    await silentServer.start();
    endpoint = silentServer.endpoint;
  });

  afterAll(async () => {
    await silentServer.stop();
  });

  it("requests fail at the request timeout", async () => {
    // The client sets no deadline of its own, so only the writer's deadlines end the calls.
    const client = new Etcd3({ hosts: endpoint, faultHandling: { host: () => noop, global: noop } });
    const writer = new EtcdChangeWriter(
      { client, prefix: uniquePrefix("change-writer"), endpoints: [endpoint], requestTimeoutMs: 1500 },
      silentLogger,
    );
    try {
      const startedAt = Date.now();
      const error = await expectServiceError(writer.write({ writes: [addTokens("model", 1n)] }), GrpcStatus.UNAVAILABLE);
      const elapsedMs = Date.now() - startedAt;
      console.log(`silent server: write rejected after ${elapsedMs} ms`);

      expect(elapsedMs).toBeLessThan(3_000);
      expect(error.message).toContain(`cannot update state in etcd at ${endpoint}: reading the stored entities failed: `);
    } finally {
      await writer.close();
      client.close();
    }
  });
});
