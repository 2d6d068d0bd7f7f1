import { create, equals } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { afterEach, describe, expect, inject, it } from "vitest";
import { SystemStateSchema } from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { checkHealth } from "../../src/health-check.js";
import { EtcdProcess } from "../harness/etcd.js";
import { etcdConfigYaml, startInProcessDaemon, waitFor, type InProcessDaemon } from "../harness/in-process-daemon.js";
import { expectCallError } from "../harness/state-client.js";
import { beyondDoublePrecision, sampleState } from "../harness/sample-state.js";

let running: InProcessDaemon | undefined;
let privateEtcd: EtcdProcess | undefined;

afterEach(async () => {
  await running?.stop();
  await privateEtcd?.stop();
  running = undefined;
  privateEtcd = undefined;
});

describe("daemon on etcd", () => {
  it("round-trips int64 values above 2^53 exactly", async () => {
    running = await startInProcessDaemon(etcdConfigYaml(inject("etcdEndpoint"), "immediate"));
    const state = create(SystemStateSchema, {
      models: { big: { tokensUsed: beyondDoublePrecision, quotaUsed: 2n ** 63n - 1n, failureCount: 2n ** 53n + 1n } },
      providers: { p: { totalQuotaUsed: 2n ** 62n + 3n } },
      pools: { chat: { rotationCount: 9_007_199_254_740_993n } },
    });

    await running.client.save({ state });
    const loaded = (await running.client.load()).state!;
    expect(loaded.models["big"]?.tokensUsed).toBe(beyondDoublePrecision);
    expect(loaded.models["big"]?.quotaUsed).toBe(9_223_372_036_854_775_807n);
    expect(loaded.models["big"]?.failureCount).toBe(9_007_199_254_740_993n);
    expect(loaded.providers["p"]?.totalQuotaUsed).toBe(4_611_686_018_427_387_907n);
    expect(loaded.pools["chat"]?.rotationCount).toBe(9_007_199_254_740_993n);
  });

  it("saves and loads 10,000 models", async () => {
    const configYaml = etcdConfigYaml(inject("etcdEndpoint"), "immediate");
    running = await startInProcessDaemon(configYaml);
    const state = sampleState({ models: 10_000 });

    const saveStartedAt = performance.now();
    await running.client.save({ state });
    const saveMs = performance.now() - saveStartedAt;
    await running.stop();

    // A new daemon loads from etcd, not from the first one's memory.
    running = await startInProcessDaemon(configYaml);
    const loadStartedAt = performance.now();
    const loaded = (await running.client.load()).state;
    const loadMs = performance.now() - loadStartedAt;
    expect(Object.keys(loaded?.models ?? {})).toHaveLength(10_000);
    expect(equals(SystemStateSchema, loaded!, state)).toBe(true);
    console.log(`10,000 models through the daemon: save ${saveMs.toFixed(0)} ms, load ${loadMs.toFixed(0)} ms`);
  });

  it("rejects a state over the entity limit and writes nothing", async () => {
    running = await startInProcessDaemon(etcdConfigYaml(inject("etcdEndpoint"), "immediate"));
    const small = sampleState({ models: 2 });
    await running.client.save({ state: small });

    const error = await expectCallError(running.client.save({ state: sampleState({ models: 100_000 }) }));
    expect(error.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(error.details).toContain("100022 models, providers and pools, over the limit of 100000");
    expect(equals(SystemStateSchema, (await running.client.load()).state!, small)).toBe(true);
  });

  it("health follows etcd reachability", async () => {
    privateEtcd = await EtcdProcess.start();
    running = await startInProcessDaemon(etcdConfigYaml(privateEtcd.endpoint, "immediate"));
    const address = running.daemon.address;
    await waitFor(async () => (await checkHealth(address, "", 2000)) === "SERVING", 10_000, "SERVING");

    await privateEtcd.kill();
    await waitFor(async () => (await checkHealth(address, "", 2000)) === "NOT_SERVING", 15_000, "NOT_SERVING");
    expect(await checkHealth(address, "modelmesh.state.v1.StateManagerService", 2000)).toBe("NOT_SERVING");

    await privateEtcd.resume();
    await waitFor(async () => (await checkHealth(address, "", 2000)) === "SERVING", 15_000, "SERVING again");
  });

  it("rejects immediate Save while etcd is down", async () => {
    privateEtcd = await EtcdProcess.start();
    running = await startInProcessDaemon(etcdConfigYaml(privateEtcd.endpoint, "immediate"));
    const before = sampleState({ tokensUsed: 1n });
    await running.client.save({ state: before });

    await privateEtcd.kill();
    const error = await expectCallError(running.client.save({ state: sampleState({ tokensUsed: 2n }) }));
    expect(error.code).toBe(grpc.status.UNAVAILABLE);
    expect(equals(SystemStateSchema, (await running.client.load()).state!, before)).toBe(true);
    expect((await running.client.getSyncStatus()).status?.pendingChanges).toBe(0n);
  });
});
