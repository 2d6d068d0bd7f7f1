import { create, equals, toBinary } from "@bufbuild/protobuf";
import { timestampFromDate, TimestampSchema } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { Etcd3 } from "etcd3";
import { afterEach, describe, expect, inject, it } from "vitest";
import { EntityKind, type EntityChange } from "../../src/gen/modelmesh/state/v1/changes_pb.js";
import type { WatchStateResponse } from "../../src/gen/modelmesh/state/v1/state_manager_service_pb.js";
import { ModelStatus, SystemStateSchema, type SystemState } from "../../src/gen/modelmesh/state/v1/state_pb.js";
import {
  etcdConfigYaml,
  startInProcessDaemon,
  uniquePrefix,
  waitFor,
  type InProcessDaemon,
} from "../harness/in-process-daemon.js";
import { expectCallError, StateClient, type CollectedStream } from "../harness/state-client.js";
import { sampleState } from "../harness/sample-state.js";

const started: InProcessDaemon[] = [];

afterEach(async () => {
  await Promise.all(started.splice(0).map((running) => running.stop()));
});

async function startDaemons(policies: string[], options: { prefix?: string; extraYaml?: string } = {}) {
  const prefix = options.prefix ?? uniquePrefix("shared");
  const daemons: InProcessDaemon[] = [];
  for (const policy of policies) {
    const yaml = etcdConfigYaml(inject("etcdEndpoint"), policy, {
      prefix,
      syncInterval: "1h",
      extraYaml: options.extraYaml ?? "",
    });
    const running = await startInProcessDaemon(yaml);
    started.push(running);
    daemons.push(running);
  }
  return { prefix, daemons };
}

function addTokens(id: string, tokens: bigint, idempotencyKey = "") {
  return { models: [{ id, add: { tokensUsed: tokens, costAccumulated: 0.5 } }], idempotencyKey };
}

function changesOf(stream: CollectedStream<WatchStateResponse>): EntityChange[] {
  return stream.messages.filter((message) => message.snapshot === undefined).flatMap((message) => message.changes);
}

describe("UpdateState across daemons", () => {
  it("sums concurrent increments from three daemons exactly", async () => {
    const { daemons } = await startDaemons(["immediate", "immediate", "immediate"]);
    const clientsPerDaemon = 4;
    const incrementsPerClient = 25;
    await daemons[0]!.client.updateState({ models: [{ id: "gpt", add: { tokensUsed: 2n ** 60n } }] });

    const clients = daemons.flatMap((running) =>
      Array.from({ length: clientsPerDaemon }, () => new StateClient(running.daemon.address)),
    );
    await Promise.all(
      clients.map(async (client) => {
        for (let step = 0; step < incrementsPerClient; step++) await client.updateState(addTokens("gpt", 1n));
      }),
    );
    clients.forEach((client) => client.close());

    const expected = 2n ** 60n + BigInt(daemons.length * clientsPerDaemon * incrementsPerClient);
    for (const running of daemons) {
      const model = (await running.client.load()).state?.models["gpt"];
      expect(model?.tokensUsed).toBe(expected);
      expect(model?.costAccumulated).toBeCloseTo(0.5 * daemons.length * clientsPerDaemon * incrementsPerClient);
    }
  });

  it("applies a retried idempotency key once", async () => {
    const { daemons } = await startDaemons(["immediate", "immediate"]);
    const first = await daemons[0]!.client.updateState(addTokens("m", 7n, "request-1"));
    expect(first.replayed).toBe(false);

    const retries = await Promise.all([
      daemons[0]!.client.updateState(addTokens("m", 7n, "request-1")),
      daemons[1]!.client.updateState(addTokens("m", 7n, "request-1")),
      daemons[1]!.client.updateState(addTokens("m", 7n, "request-1")),
    ]);
    for (const retry of retries) {
      expect(retry.replayed).toBe(true);
      expect(retry.revision).toBe(first.revision);
    }
    await daemons[1]!.client.updateState(addTokens("m", 1n, "request-2"));
    const model = (await daemons[1]!.client.load()).state?.models["m"];
    expect(model?.tokensUsed).toBe(8n);
  });

  it("keeps the later time and refuses a negative counter", async () => {
    const { daemons } = await startDaemons(["immediate"]);
    const client = daemons[0]!.client;
    const later = timestampFromDate(new Date("2026-12-04T12:00:00Z"));
    const earlier = timestampFromDate(new Date("2026-12-04T11:00:00Z"));
    await client.updateState({ models: [{ id: "m", keepLatest: { cooldownUntil: later }, add: { failureCount: 2n } }] });
    await client.updateState({ models: [{ id: "m", keepLatest: { cooldownUntil: earlier } }] });
    expect((await client.load()).state?.models["m"]?.cooldownUntil).toEqual(later);

    const error = await expectCallError(client.updateState({ models: [{ id: "m", add: { failureCount: -5n } }] }));
    expect(error.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(error.details).toContain("failure_count");
    expect((await client.load()).state?.models["m"]?.failureCount).toBe(2n);
  });

  it("merges a periodic flush onto newer values from another daemon", async () => {
    const { daemons } = await startDaemons(["periodic", "immediate"]);
    const [periodic, immediate] = daemons as [InProcessDaemon, InProcessDaemon];
    const setErrorRate = (errorRate: number, tokens: bigint) => ({
      models: [{ id: "m", set: { errorRate }, setFields: { paths: ["error_rate"] }, add: { tokensUsed: tokens } }],
    });
    await immediate.client.updateState(setErrorRate(0.1, 10n));
    await waitFor(async () => (await periodic.client.load()).state?.models["m"] !== undefined, 5000, "the model on the periodic daemon");

    await periodic.client.updateState({
      models: [
        { id: "m", set: { errorRate: 0.5, status: ModelStatus.STANDBY }, setFields: { paths: ["error_rate", "status"] }, add: { tokensUsed: 5n } },
      ],
    });
    expect((await periodic.client.getSyncStatus()).status?.pendingChanges).toBe(1n);
    // The immediate daemon writes error_rate later, so its value is the newer one.
    await immediate.client.updateState(setErrorRate(0.9, 3n));
    await waitFor(
      async () => (await periodic.client.load()).state?.models["m"]?.tokensUsed === 18n,
      5000,
      "the periodic daemon's view to include both additions",
    );

    await periodic.client.sync();
    const stored = (await immediate.client.load()).state?.models["m"];
    expect(stored?.tokensUsed).toBe(18n);
    expect(stored?.errorRate).toBe(0.9);
    expect(stored?.status).toBe(ModelStatus.STANDBY);
  });
});

describe("WatchState", () => {
  it("reaches another daemon's stream promptly", async () => {
    const { daemons } = await startDaemons(["immediate", "immediate"]);
    const [writer, watched] = daemons as [InProcessDaemon, InProcessDaemon];
    const stream = watched.client.watchState({ kinds: [EntityKind.MODEL] });
    await stream.waitFor((message) => message.snapshot?.last === true, 5000, "the initial snapshot");

    const delaysMs: number[] = [];
    for (let round = 0; round < 5; round++) {
      const until = timestampFromDate(new Date(Date.now() + 30_000 + round));
      const sentAt = performance.now();
      await writer.client.updateState({ models: [{ id: "m", keepLatest: { cooldownUntil: until } }] });
      await stream.waitFor(
        (message) => message.changes.some((change) => change.value.case === "model" &&
            change.value.value.cooldownUntil !== undefined &&
            equals(TimestampSchema, change.value.value.cooldownUntil, until)),
        5000,
        `cooldown ${round} on the other daemon`,
      );
      delaysMs.push(performance.now() - sentAt);
    }
    console.log(`UpdateState on one daemon to WatchState on another, ms: ${delaysMs.map((ms) => ms.toFixed(1)).join(", ")}`);
    stream.call.cancel();
  });

  it("resumes from a revision with no gap and no repeat", async () => {
    const { daemons } = await startDaemons(["immediate", "immediate"]);
    const [writer, watched] = daemons as [InProcessDaemon, InProcessDaemon];
    const revisions: bigint[] = [];
    for (let step = 0; step < 10; step++) revisions.push((await writer.client.updateState(addTokens(`m${step % 3}`, 1n))).revision);

    const resumeAfter = revisions[4]!;
    await waitFor(async () => (await watched.client.load()).state?.models["m0"] !== undefined, 5000, "the watched daemon to catch up");
    const stream = watched.client.watchState({ startAfterRevision: resumeAfter });
    for (let step = 10; step < 15; step++) revisions.push((await writer.client.updateState(addTokens(`m${step % 3}`, 1n))).revision);

    const expected = revisions.filter((revision) => revision > resumeAfter);
    await waitFor(() => changesOf(stream).length >= expected.length, 5000, "every change after the resume revision");
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(stream.messages.some((message) => message.snapshot !== undefined)).toBe(false);
    expect(changesOf(stream).map((change) => change.revision)).toEqual(expected);
    stream.call.cancel();
  });

  it("resyncs a resume whose revision etcd compacted", async () => {
    const { daemons } = await startDaemons(["immediate"]);
    const client = daemons[0]!.client;
    const old = (await client.updateState(addTokens("a", 1n))).revision;
    await client.updateState(addTokens("b", 1n));
    const latest = (await client.updateState(addTokens("c", 1n))).revision;
    const etcd = new Etcd3({ hosts: inject("etcdEndpoint") });
    try {
      await etcd.kv.compact({ revision: latest.toString(), physical: true });
    } finally {
      etcd.close();
    }

    const stream = client.watchState({ startAfterRevision: old });
    const last = await stream.waitFor((message) => message.snapshot?.last === true, 5000, "the resync snapshot");
    expect(last.snapshot?.resync).toBe(true);
    const snapshotIds = stream.messages.filter((message) => message.snapshot).flatMap((message) => message.changes.map((change) => change.id));
    expect(snapshotIds.sort()).toEqual(["a", "b", "c"]);

    const after = (await client.updateState(addTokens("d", 1n))).revision;
    const change = await stream.waitFor((message) => message.changes.some((entry) => entry.id === "d"), 5000, "a change after the resync");
    expect(change.revision).toBe(after);
    stream.call.cancel();
  });

  it("filters by kind and id and sends progress while quiet", async () => {
    const { daemons } = await startDaemons(["immediate"], { extraYaml: "server:\n  watch_progress_interval: 200ms\n" });
    const client = daemons[0]!.client;
    const stream = client.watchState({ kinds: [EntityKind.PROVIDER], ids: ["openai"] });
    await stream.waitFor((message) => message.snapshot?.last === true, 5000, "the initial snapshot");

    await client.updateState({
      models: [{ id: "openai", add: { tokensUsed: 1n } }],
      providers: [{ id: "anthropic", add: { totalCost: 1 } }, { id: "openai", add: { totalCost: 2 } }],
    });
    const change = await stream.waitFor((message) => message.changes.length > 0 && !message.snapshot, 5000, "the provider change");
    expect(change.changes.map((entry) => [entry.kind, entry.id])).toEqual([[EntityKind.PROVIDER, "openai"]]);

    const progress = await stream.waitFor(
      (message) => message.changes.length === 0 && message.snapshot === undefined,
      5000,
      "a progress message",
    );
    expect(progress.revision).toBeGreaterThanOrEqual(change.revision);
    stream.call.cancel();
  });
});

describe("large states", () => {
  it("round-trips 50,000 models through Save, Load and LoadStream", async () => {
    const { daemons } = await startDaemons(["immediate", "immediate"]);
    const state = sampleState({ models: 50_000, idPrefix: "provider-family/model-name-" });
    const encodedBytes = toBinary(SystemStateSchema, state).length;
    expect(encodedBytes).toBeGreaterThan(4 * 1024 * 1024);
    const savingClient = new StateClient(daemons[0]!.daemon.address);
    const startedAt = performance.now();
    await savingClient.save({ state });
    const saveMs = performance.now() - startedAt;
    savingClient.close();

    // A client with gRPC's default 4 MiB receive limit reads the state through LoadStream.
    const reader = daemons[1]!.client;
    await waitFor(async () => (await partsOf(reader)).models === 50_000, 20_000, "the other daemon to follow the save");
    const loaded = await loadStreamed(reader);
    expect(equals(SystemStateSchema, loaded, state)).toBe(true);

    const unaryClient = new StateClient(daemons[1]!.daemon.address, { "grpc.max_receive_message_length": -1 });
    const unary = (await unaryClient.load()).state!;
    unaryClient.close();
    expect(equals(SystemStateSchema, unary, state)).toBe(true);
    console.log(`50,000 models (${(encodedBytes / 1048576).toFixed(1)} MiB encoded): Save ${saveMs.toFixed(0)} ms`);

    const tooLarge = await expectCallError(reader.load());
    expect(tooLarge.code).toBe(grpc.status.RESOURCE_EXHAUSTED);

    // WatchState sends the same state as a snapshot in messages the default limit accepts.
    const stream = reader.watchState({ kinds: [EntityKind.MODEL] });
    await stream.waitFor((message) => message.snapshot?.last === true, 30_000, "the end of the snapshot");
    const snapshotModels = new Set(stream.messages.flatMap((message) => message.changes.map((change) => change.id)));
    expect(snapshotModels.size).toBe(50_000);
    expect(stream.messages.length).toBeGreaterThan(1);
    stream.call.cancel();
  });
});

async function partsOf(client: StateClient): Promise<{ models: number }> {
  const state = await loadStreamed(client);
  return { models: Object.keys(state.models).length };
}

async function loadStreamed(client: StateClient): Promise<SystemState> {
  const stream = client.loadStream();
  const status = await stream.ended(30_000);
  expect(status.code).toBe(grpc.status.OK);
  const merged = create(SystemStateSchema);
  for (const message of stream.messages) {
    Object.assign(merged.models, message.part?.models);
    Object.assign(merged.providers, message.part?.providers);
    Object.assign(merged.pools, message.part?.pools);
    if (message.part?.timestamp !== undefined) merged.timestamp = message.part.timestamp;
  }
  return merged;
}
