import { randomUUID } from "node:crypto";
import { create, equals } from "@bufbuild/protobuf";
import { timestampFromDate } from "@bufbuild/protobuf/wkt";
import { status as GrpcStatus } from "@grpc/grpc-js";
import { Etcd3 } from "etcd3";
import { pino } from "pino";
import { afterAll, afterEach, beforeAll, describe, expect, inject, it } from "vitest";
import {
  DeactivationReason,
  ModelStateSchema,
  ModelStatus,
  PoolStateSchema,
  ProviderStateSchema,
  SystemStateSchema,
  type SystemState,
} from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { ServiceError } from "../../src/server/service-error.js";
import { EtcdConnector, type EtcdConnectorOptions } from "../../src/storage/etcd-connector.js";
import { captureLogger } from "../harness/captured-logger.js";
import { EtcdProcess } from "../harness/etcd.js";
import { SilentServer } from "../harness/silent-server.js";

const silentLogger = pino({ level: "silent" });

function randomPrefix(): string {
  return `test/etcd-connector/${randomUUID()}`;
}

/** Builds a state of `count` models named `${namePrefix}${i}`, each with `tokensUsed` set to `marker`. */
function modelsState(count: number, namePrefix: string, marker: bigint): SystemState {
  const state = create(SystemStateSchema, { timestamp: timestampFromDate(new Date()) });
  for (let i = 0; i < count; i++) {
    state.models[`${namePrefix}${i}`] = create(ModelStateSchema, {
      status: ModelStatus.ACTIVE,
      tokensUsed: marker,
      quotaUsed: BigInt(i),
      errorRate: i / count,
    });
  }
  return state;
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

describe("EtcdConnector on the shared etcd", () => {
  const endpoint = inject("etcdEndpoint");
  const raw = new Etcd3({ hosts: endpoint });
  const opened: EtcdConnector[] = [];

  async function openConnector(prefix: string, extra: Partial<EtcdConnectorOptions> = {}, logger = silentLogger) {
    const connector = await EtcdConnector.open({ endpoints: [endpoint], prefix, requestTimeoutMs: 5000, ...extra }, logger);
    opened.push(connector);
    return connector;
  }

  async function keysUnder(prefix: string): Promise<string[]> {
    return await raw.getAll().prefix(prefix).keys();
  }

  /** Returns the generation id that `prefix/current` names. */
  async function currentGeneration(prefix: string): Promise<string> {
    const pointer = (await raw.get(`${prefix}/current`).json()) as { generation: string } | null;
    expect(pointer).not.toBeNull();
    return pointer!.generation;
  }

  afterEach(async () => {
    await Promise.all(opened.splice(0).map((connector) => connector.close()));
  });

  afterAll(() => {
    raw.close();
  });

  it("load on an empty prefix returns undefined", async () => {
    const connector = await openConnector(randomPrefix());

    expect(await connector.load()).toBeUndefined();
  });

  it("save and load round-trip a small state exactly", async () => {
    const prefix = randomPrefix();
    const connector = await openConnector(prefix);
    const state = create(SystemStateSchema, {
      timestamp: { seconds: 1_767_225_600n, nanos: 123_456_789 },
      models: {
        "openai/gpt-4o": create(ModelStateSchema, {
          status: ModelStatus.STANDBY,
          failureCount: 3n,
          errorRate: 0.25,
          cooldownRemaining: 12.5,
          quotaUsed: 2n ** 60n + 7n,
          tokensUsed: 2n ** 63n - 1n,
          costAccumulated: 1234.5678,
          lastRequest: { seconds: 1_767_225_000n, nanos: 1 },
          lastFailure: { seconds: 1_767_225_100n, nanos: 999_999_999 },
          deactivationReason: DeactivationReason.ERROR_THRESHOLD,
        }),
        "modèle-ünïcode": create(ModelStateSchema, { tokensUsed: -(2n ** 62n) }),
      },
      providers: {
        openai: create(ProviderStateSchema, {
          available: true,
          authValid: true,
          lastProbe: { seconds: 1_767_225_500n, nanos: 0 },
          availabilityScore: 0,
          activeModelCount: 2n ** 53n + 1n,
          totalQuotaUsed: 2n ** 60n + 7n,
          totalCost: 99.99,
        }),
        "never-probed": create(ProviderStateSchema, {}),
      },
      pools: {
        default: create(PoolStateSchema, {
          activeModels: ["openai/gpt-4o"],
          standbyModels: ["modèle-ünïcode"],
          rotationCount: 2n ** 60n + 7n,
          lastRotation: { seconds: 1_767_225_550n, nanos: 500 },
        }),
      },
    });

    await connector.save(state);
    const loaded = await connector.load();

    expect(loaded).toBeDefined();
    expect(equals(SystemStateSchema, loaded!, state)).toBe(true);
    expect(loaded!.models["openai/gpt-4o"]!.quotaUsed).toBe(2n ** 60n + 7n);
    expect(loaded!.providers["openai"]!.availabilityScore).toBe(0);
    expect(loaded!.providers["never-probed"]!.availabilityScore).toBeUndefined();
    expect(loaded!.timestamp).toEqual(state.timestamp);
  });

  it("round trip of an empty state", async () => {
    const connector = await openConnector(randomPrefix());
    const state = create(SystemStateSchema);

    await connector.save(state);
    const loaded = await connector.load();

    expect(loaded).toBeDefined();
    expect(equals(SystemStateSchema, loaded!, state)).toBe(true);
    expect(loaded!.timestamp).toBeUndefined();
  });

  it("save and load 10,000 models", async () => {
    const prefix = randomPrefix();
    const connector = await openConnector(prefix);
    const state = modelsState(10_000, "model-", 2n ** 60n + 7n);

    let startedAt = performance.now();
    await connector.save(state);
    const saveMs = performance.now() - startedAt;
    startedAt = performance.now();
    const loaded = await connector.load();
    const loadMs = performance.now() - startedAt;
    console.log(`10,000 models: save ${saveMs.toFixed(0)} ms, load ${loadMs.toFixed(0)} ms`);

    expect(Object.keys(loaded!.models)).toHaveLength(10_000);
    expect(equals(SystemStateSchema, loaded!, state)).toBe(true);
    expect(await keysUnder(`${prefix}/generations/`)).toHaveLength(10_000);
  });

  it("large pools span several transactions", async () => {
    const prefix = randomPrefix();
    const { logger, lines } = captureLogger("debug");
    const connector = await openConnector(prefix, {}, logger);
    const state = modelsState(300, "model-", 1n);
    // 60 pools of 6,000 model ids are about 100 KB each and 6 MB in all, which is more than
    // fits one transaction or one 4 MiB range response.
    const longList = Array.from({ length: 6_000 }, (_, i) => `provider-${i % 7}/model-${i}`);
    for (let i = 0; i < 60; i++) {
      state.pools[`pool-${i}`] = create(PoolStateSchema, {
        activeModels: longList.slice(0, 3_000),
        standbyModels: longList.slice(3_000),
        rotationCount: BigInt(i),
      });
    }

    await connector.save(state);
    const loaded = await connector.load();

    expect(equals(SystemStateSchema, loaded!, state)).toBe(true);
    const saved = lines.find((line) => line["msg"] === "state saved to etcd");
    expect(saved?.["entities"]).toBe(360);
    expect(saved?.["transactions"]).toBeGreaterThan(5);
    const smallerPages = lines.filter((line) => line["msg"] === "etcd range response too large, reading fewer keys per page");
    expect(smallerPages.length).toBeGreaterThan(0);
  });

  it("readers see whole snapshots during saves", async () => {
    const prefix = randomPrefix();
    const writer = await openConnector(prefix);
    const readers = [await openConnector(prefix), await openConnector(prefix), await openConnector(prefix)];
    const oldState = modelsState(10_000, "old-", 1n);
    const newState = modelsState(10_000, "new-", 2n);
    await writer.save(oldState);

    // Six saves that alternate between the two states give many commits for a load to overlap.
    let savesDone = false;
    const saving = (async () => {
      for (let i = 0; i < 6; i++) await writer.save(i % 2 === 0 ? newState : oldState);
    })().finally(() => {
      savesDone = true;
    });
    const seen = { old: 0, new: 0 };
    const pollUntilSaved = async (reader: EtcdConnector) => {
      while (!savesDone) {
        const loaded = await reader.load();
        const names = Object.keys(loaded!.models);
        const markers = new Set(Object.values(loaded!.models).map((model) => model.tokensUsed));
        expect(names).toHaveLength(10_000);
        expect(markers.size).toBe(1);
        const snapshot = markers.has(1n) ? "old" : "new";
        expect(markers.has(snapshot === "old" ? 1n : 2n)).toBe(true);
        expect(names.every((name) => name.startsWith(`${snapshot}-`))).toBe(true);
        seen[snapshot]++;
      }
    };
    await Promise.all([saving, ...readers.map(pollUntilSaved)]);
    console.log(`readers during saves: ${seen.old} old and ${seen.new} new snapshots`);

    expect(seen.old).toBeGreaterThan(0);
    expect(seen.new).toBeGreaterThan(0);
    expect(equals(SystemStateSchema, (await readers[0]!.load())!, oldState)).toBe(true);
  });

  it("concurrent saves leave one generation", async () => {
    const prefix = randomPrefix();
    const first = await openConnector(prefix);
    const second = await openConnector(prefix);
    const firstState = modelsState(2_000, "first-", 1n);
    const secondState = modelsState(2_000, "second-", 2n);

    await Promise.all([first.save(firstState), second.save(secondState)]);
    const loaded = await first.load();

    const matchesFirst = equals(SystemStateSchema, loaded!, firstState);
    const matchesSecond = equals(SystemStateSchema, loaded!, secondState);
    expect(matchesFirst || matchesSecond).toBe(true);
    const generation = await currentGeneration(prefix);
    const generationKeys = await keysUnder(`${prefix}/generations/`);
    expect(generationKeys).toHaveLength(2_000);
    expect(generationKeys.every((key) => key.startsWith(`${prefix}/generations/${generation}/`))).toBe(true);
    expect(await keysUnder(`${prefix}/staging`)).toEqual([]);
  });

  it("cancelled save keeps the old state", async () => {
    const prefix = randomPrefix();
    const connector = await openConnector(prefix);
    const oldState = modelsState(100, "old-", 1n);
    await connector.save(oldState);
    const oldGeneration = await currentGeneration(prefix);

    // Cancel once the first entity transaction of the new generation has applied.
    const controller = new AbortController();
    const watcher = await raw.watch().prefix(`${prefix}/generations/`).create();
    watcher.on("put", () => controller.abort());
    const saving = connector.save(modelsState(10_000, "new-", 2n), { signal: controller.signal });
    const error = await expectServiceError(saving, GrpcStatus.CANCELLED);
    await watcher.cancel();

    expect(controller.signal.aborted).toBe(true);
    expect(error.message).toMatch(/^cannot (write|commit) generation [0-9a-f-]+: the request was cancelled$/);
    expect(equals(SystemStateSchema, (await connector.load())!, oldState)).toBe(true);
    expect(await currentGeneration(prefix)).toBe(oldGeneration);
    const generationKeys = await keysUnder(`${prefix}/generations/`);
    expect(generationKeys).toHaveLength(100);
    expect(generationKeys.every((key) => key.startsWith(`${prefix}/generations/${oldGeneration}/`))).toBe(true);
    expect(await keysUnder(`${prefix}/staging`)).toEqual([]);
  });

  it("open removes orphans, keeps live writers", async () => {
    const prefix = randomPrefix();
    const { logger, lines } = captureLogger();
    const writer = await openConnector(prefix);
    const oldState = modelsState(10, "old-", 1n);
    await writer.save(oldState);
    // A writer that died leaves its staging key and entity keys, but its lease key is gone.
    const deadLease = raw.lease(30, { autoKeepAlive: false });
    const orphan = "0000000000aa-00000000000000aa";
    await raw.put(`${prefix}/staging/${orphan}`).value("");
    await deadLease.put(`${prefix}/staging-leases/${orphan}`).value("");
    await raw.put(`${prefix}/generations/${orphan}/models/half-written`).value("x");
    await deadLease.revoke();
    // A writer still at work has its lease key.
    const liveLease = raw.lease(30);
    const live = "0000000000bb-00000000000000bb";
    await raw.put(`${prefix}/staging/${live}`).value("");
    await liveLease.put(`${prefix}/staging-leases/${live}`).value("");
    await raw.put(`${prefix}/generations/${live}/models/in-progress`).value("x");

    const reopened = await openConnector(prefix, {}, logger);

    expect(await keysUnder(`${prefix}/generations/${orphan}/`)).toEqual([]);
    expect(await keysUnder(`${prefix}/staging/${orphan}`)).toEqual([]);
    expect(await keysUnder(`${prefix}/generations/${live}/`)).toHaveLength(1);
    expect(await keysUnder(`${prefix}/staging/${live}`)).toHaveLength(1);
    expect(lines.filter((line) => line["msg"] === "orphan generation removed").map((line) => line["generation"])).toEqual([
      orphan,
    ]);
    expect(equals(SystemStateSchema, (await reopened.load())!, oldState)).toBe(true);
    await liveLease.revoke();
  });

  it("fenced save commits while the lock key is unchanged", async () => {
    const prefix = randomPrefix();
    const connector = await openConnector(prefix);
    const lockKey = `${prefix}-locks/fleet/holder`;
    const written = await raw.kv.put({ key: Buffer.from(lockKey), value: Buffer.from("holder") });
    const fence = { lockName: "fleet", token: BigInt(written.header.revision), etcdKey: lockKey, isCurrent: () => true };
    const state = modelsState(300, "model-", 1n);

    await connector.save(state, { fence });

    expect(equals(SystemStateSchema, (await connector.load())!, state)).toBe(true);
  });

  it("fenced save fails once the lock key changed", async () => {
    const prefix = randomPrefix();
    const connector = await openConnector(prefix);
    const oldState = modelsState(10, "old-", 1n);
    await connector.save(oldState);
    const oldGeneration = await currentGeneration(prefix);
    const lockKey = `${prefix}-locks/fleet/holder`;
    const written = await raw.kv.put({ key: Buffer.from(lockKey), value: Buffer.from("holder") });
    const fence = { lockName: "fleet", token: BigInt(written.header.revision), etcdKey: lockKey, isCurrent: () => true };
    // The grant ends and another holder queues under the same key, so its create revision differs.
    await raw.delete().key(lockKey);
    await raw.put(lockKey).value("next holder");

    const error = await expectServiceError(connector.save(modelsState(300, "new-", 2n), { fence }), GrpcStatus.FAILED_PRECONDITION);

    expect(error.message).toBe(
      `cannot save with fencing token ${fence.token}: lock "fleet" was released or expired before the commit`,
    );
    expect(equals(SystemStateSchema, (await connector.load())!, oldState)).toBe(true);
    expect(await currentGeneration(prefix)).toBe(oldGeneration);
    expect(await keysUnder(`${prefix}/generations/`)).toHaveLength(10);
    expect(await keysUnder(`${prefix}/staging`)).toEqual([]);
  });

  it("in-process fence that ended fails the save", async () => {
    const prefix = randomPrefix();
    const connector = await openConnector(prefix);
    const fence = { lockName: "fleet", token: 7n, isCurrent: () => false };

    await expectServiceError(connector.save(modelsState(10, "model-", 1n), { fence }), GrpcStatus.FAILED_PRECONDITION);

    expect(await connector.load()).toBeUndefined();
    expect(await keysUnder(`${prefix}/`)).toEqual([]);
  });

  it("oversized entity rejected before writing", async () => {
    const prefix = randomPrefix();
    const connector = await openConnector(prefix);
    const state = modelsState(200, "model-", 1n);
    // 120,000 ids of about 10 bytes encode to more than the default 1 MiB limit.
    const hugeList = Array.from({ length: 120_000 }, (_, i) => `model-${i}`);
    state.pools["x"] = create(PoolStateSchema, { activeModels: hugeList });

    const error = await expectServiceError(connector.save(state), GrpcStatus.RESOURCE_EXHAUSTED);

    expect(error.message).toMatch(
      /^cannot save pool "x": its encoded state is \d+ bytes, over the etcd limit of 1048576 bytes$/,
    );
    expect(await keysUnder(`${prefix}/`)).toEqual([]);
    expect(await connector.load()).toBeUndefined();
  });

  it("maxEntityBytes sets the entity limit", async () => {
    const connector = await openConnector(randomPrefix(), { maxEntityBytes: 10 });
    const state = create(SystemStateSchema, {
      models: { small: create(ModelStateSchema, { tokensUsed: 1n }) },
      providers: { big: create(ProviderStateSchema, { totalQuotaUsed: 2n ** 60n, totalCost: 1.5 }) },
    });

    const error = await expectServiceError(connector.save(state), GrpcStatus.RESOURCE_EXHAUSTED);

    expect(error.message).toMatch(/^cannot save provider "big": its encoded state is \d+ bytes, over the etcd limit of 10 bytes$/);
  });
});

// Tests that kill etcd or compact its history run on a private etcd, so other test files never see it.
describe("EtcdConnector on a private etcd", () => {
  let etcd: EtcdProcess;
  let etcdDown = false;
  const opened: EtcdConnector[] = [];

  async function killEtcd(): Promise<void> {
    etcdDown = true;
    await etcd.kill();
  }

  // EtcdProcess.resume starts a second etcd when one runs, so it is called only after a kill.
  async function resumeEtcd(): Promise<void> {
    if (!etcdDown) return;
    await etcd.resume();
    etcdDown = false;
  }

  async function openConnector(prefix: string, requestTimeoutMs = 2000, logger = silentLogger) {
    const connector = await EtcdConnector.open({ endpoints: [etcd.endpoint], prefix, requestTimeoutMs }, logger);
    opened.push(connector);
    return connector;
  }

  async function waitUntil(condition: () => Promise<boolean>, timeoutMs: number): Promise<number> {
    const startedAt = Date.now();
    while (Date.now() - startedAt < timeoutMs) {
      if (await condition()) return Date.now() - startedAt;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    throw new Error(`condition not met within ${timeoutMs} ms`);
  }

  beforeAll(async () => {
    etcd = await EtcdProcess.start();
  });

  afterEach(async () => {
    await Promise.all(opened.splice(0).map((connector) => connector.close()));
    await resumeEtcd();
  });

  afterAll(async () => {
    await etcd.stop();
  });

  it("load restarts after a compaction", async () => {
    const prefix = randomPrefix();
    const { logger, lines } = captureLogger();
    const connector = await openConnector(prefix, 5000, logger);
    const raw = new Etcd3({ hosts: etcd.endpoint });
    const state = modelsState(20_000, "model-", 1n);
    await connector.save(state);
    let startedAt = performance.now();
    await connector.load();
    const loadMs = performance.now() - startedAt;

    // Half-way through a load, a write and a compaction at its revision remove the revision
    // that the load reads its pages at. Timing decides whether the compaction lands mid-load,
    // so the test tries up to three times.
    const retried = () => lines.some((line) => line["msg"] === "snapshot revision compacted during load, loading again");
    for (let attempt = 0; attempt < 3 && !retried(); attempt++) {
      startedAt = performance.now();
      const loading = connector.load();
      await new Promise((resolve) => setTimeout(resolve, loadMs / 2));
      const written = await raw.kv.put({ key: Buffer.from(`${prefix}/unrelated`), value: Buffer.from("x") });
      await raw.kv.compact({ revision: written.header.revision });
      const loaded = await loading;

      expect(equals(SystemStateSchema, loaded!, state)).toBe(true);
    }

    raw.close();
    expect(retried()).toBe(true);
  });

  it("isReachable follows etcd going down and coming back", async () => {
    const connector = await openConnector(randomPrefix());
    expect(await connector.isReachable()).toBe(true);

    await killEtcd();
    const probeStartedAt = Date.now();
    expect(await connector.isReachable()).toBe(false);
    expect(Date.now() - probeStartedAt).toBeLessThan(1_500);

    // Polling while etcd starts shows that no client-side backoff delays the recovery.
    const resumeStartedAt = Date.now();
    const resuming = resumeEtcd();
    await waitUntil(() => connector.isReachable(), 20_000);
    console.log(`isReachable true again ${Date.now() - resumeStartedAt} ms after etcd was restarted`);
    await resuming;
  });

  it("load and save fail while etcd is down", async () => {
    const prefix = randomPrefix();
    const connector = await openConnector(prefix);
    const state = modelsState(50, "model-", 1n);
    await connector.save(state);

    await killEtcd();
    let startedAt = Date.now();
    const loadError = await expectServiceError(connector.load(), GrpcStatus.UNAVAILABLE);
    const loadMs = Date.now() - startedAt;
    startedAt = Date.now();
    const saveError = await expectServiceError(connector.save(state), GrpcStatus.UNAVAILABLE);
    const saveMs = Date.now() - startedAt;
    console.log(`etcd down: load rejected after ${loadMs} ms, save after ${saveMs} ms`);

    expect(loadMs).toBeLessThan(5_000);
    expect(saveMs).toBeLessThan(5_000);
    expect(loadError.message).toContain(`cannot load state from etcd at ${etcd.endpoint}: `);
    expect(saveError.message).toContain(`cannot save state to etcd at ${etcd.endpoint}: `);

    await resumeEtcd();
    await waitUntil(() => connector.isReachable(), 15_000);
    expect(equals(SystemStateSchema, (await connector.load())!, state)).toBe(true);
  });

  it("save cut by etcd crash leaves removable orphan", async () => {
    const prefix = randomPrefix();
    const connector = await openConnector(prefix);
    const oldState = modelsState(100, "old-", 1n);
    await connector.save(oldState);

    // Kill etcd once the first entity transaction of the new generation has applied.
    const raw = new Etcd3({ hosts: etcd.endpoint });
    const watcher = await raw.watch().prefix(`${prefix}/generations/`).create();
    let killing: Promise<void> | undefined;
    watcher.on("put", () => {
      killing ??= killEtcd();
    });
    const saveError = await expectServiceError(connector.save(modelsState(10_000, "new-", 2n)), GrpcStatus.UNAVAILABLE);
    await killing;
    raw.close();
    expect(saveError.message).toContain(`cannot save state to etcd at ${etcd.endpoint}: `);

    await resumeEtcd();
    const inspector = new Etcd3({ hosts: etcd.endpoint });
    try {
      await waitUntil(() => connector.isReachable(), 15_000);
      const oldGeneration = ((await inspector.get(`${prefix}/current`).json()) as { generation: string }).generation;
      const staged = await inspector.getAll().prefix(`${prefix}/staging/`).keys();
      expect(staged).toHaveLength(1);
      const orphan = staged[0]!.slice(`${prefix}/staging/`.length);
      expect(orphan).not.toBe(oldGeneration);
      expect((await inspector.getAll().prefix(`${prefix}/generations/${orphan}/`).keys()).length).toBeGreaterThan(0);
      // Waiting 30 s for the writer's lease to expire is too slow for a test, so revoke it as expiry would.
      const { leases } = await inspector.leaseClient.leaseLeases();
      await Promise.all(leases.map((lease) => inspector.leaseClient.leaseRevoke({ ID: lease.ID })));

      const reopened = await openConnector(prefix);

      expect(await inspector.getAll().prefix(`${prefix}/generations/${orphan}/`).keys()).toEqual([]);
      expect(await inspector.getAll().prefix(`${prefix}/staging`).keys()).toEqual([]);
      expect(equals(SystemStateSchema, (await reopened.load())!, oldState)).toBe(true);
    } finally {
      inspector.close();
    }
  });
});

describe("EtcdConnector on a server that never responds", () => {
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
    const connector = await EtcdConnector.open({ endpoints: [endpoint], prefix: randomPrefix(), requestTimeoutMs: 1500 }, silentLogger);
    try {
      let startedAt = Date.now();
      expect(await connector.isReachable()).toBe(false);
      const probeMs = Date.now() - startedAt;
      startedAt = Date.now();
      const loadError = await expectServiceError(connector.load(), GrpcStatus.UNAVAILABLE);
      const loadMs = Date.now() - startedAt;
      startedAt = Date.now();
      await expectServiceError(connector.save(modelsState(5, "model-", 1n)), GrpcStatus.UNAVAILABLE);
      const saveMs = Date.now() - startedAt;
      console.log(`silent server: probe ${probeMs} ms, load ${loadMs} ms, save ${saveMs} ms`);

      expect(probeMs).toBeLessThan(1_500);
      expect(loadMs).toBeLessThan(3_000);
      expect(saveMs).toBeLessThan(6_000);
      expect(loadError.message).toContain("DEADLINE_EXCEEDED");
    } finally {
      await connector.close();
    }
  });
});
