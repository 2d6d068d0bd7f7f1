import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { pino } from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { EntityKind } from "../../src/gen/modelmesh/state/v1/changes_pb.js";
import { LocalFileConnector } from "../../src/storage/local-file-connector.js";
import { startInProcessDaemon, waitFor, type InProcessDaemon } from "../harness/in-process-daemon.js";
import { sampleState } from "../harness/sample-state.js";
import { expectCallError, StateClient } from "../harness/state-client.js";

let running: InProcessDaemon | undefined;
let folder: string | undefined;

afterEach(async () => {
  await running?.stop();
  if (folder !== undefined) await rm(folder, { recursive: true, force: true });
  running = undefined;
  folder = undefined;
});

async function startLocalFile(policy: string): Promise<string> {
  folder = await mkdtemp(join(tmpdir(), "modelmesh-update-"));
  const path = join(folder, "state.bin");
  running = await startInProcessDaemon(
    `storage:\n  connector: modelmesh.local-file.v1\n  persistence: { sync_policy: ${policy}, sync_interval: 1h }\n  local_file: { path: ${JSON.stringify(path)} }\n`,
  );
  return path;
}

describe("UpdateState on the local-file connector", () => {
  it("writes grouped concurrent updates before returning", async () => {
    const path = await startLocalFile("immediate");
    const clients = Array.from({ length: 8 }, () => new StateClient(running!.daemon.address));
    await Promise.all(
      clients.map(async (client) => {
        for (let step = 0; step < 20; step++) {
          await client.updateState({ models: [{ id: "m", add: { tokensUsed: 1n } }] });
        }
      }),
    );
    clients.forEach((client) => client.close());

    const stored = await new LocalFileConnector(path, pino({ level: "silent" })).load();
    expect(stored?.models["m"]?.tokensUsed).toBe(160n);
    expect((await running!.client.load()).state?.models["m"]?.tokensUsed).toBe(160n);
  });

  it("keeps periodic updates pending until Sync", async () => {
    const path = await startLocalFile("periodic");
    const client = running!.client;
    const response = await client.updateState({ pools: [{ id: "chat", add: { rotationCount: 3n } }] });
    expect(response.changes[0]?.value.case).toBe("pool");
    expect((await client.getSyncStatus()).status?.pendingChanges).toBe(1n);
    expect(await new LocalFileConnector(path, pino({ level: "silent" })).load()).toBeUndefined();

    await client.sync();
    const stored = await new LocalFileConnector(path, pino({ level: "silent" })).load();
    expect(stored?.pools["chat"]?.rotationCount).toBe(3n);
  });

  it("rejects an invalid update naming the field", async () => {
    await startLocalFile("immediate");
    const error = await expectCallError(
      running!.client.updateState({ models: [{ id: "m", setFields: { paths: ["colour"] } }] }),
    );
    expect(error.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(error.details).toContain("models[0].set_fields");
    expect((await running!.client.load()).state).toBeUndefined();
  });
});

describe("UpdateState idempotency on the local-file connector", () => {
  it("applies concurrent retries of one key once", async () => {
    await startLocalFile("immediate");
    const request = { models: [{ id: "m", add: { tokensUsed: 1n } }], idempotencyKey: "retry-1" };
    const responses = await Promise.all(Array.from({ length: 20 }, () => running!.client.updateState(request)));

    expect(responses.filter((response) => !response.replayed)).toHaveLength(1);
    expect(new Set(responses.map((response) => response.revision)).size).toBe(1);
    expect((await running!.client.load()).state?.models["m"]?.tokensUsed).toBe(1n);
  });

  it("applies a reused key with other content as a new request", async () => {
    await startLocalFile("immediate");
    await running!.client.updateState({ models: [{ id: "m", add: { tokensUsed: 1n } }], idempotencyKey: "reused" });
    const other = await running!.client.updateState({ models: [{ id: "m", add: { tokensUsed: 5n } }], idempotencyKey: "reused" });

    expect(other.replayed).toBe(false);
    expect((await running!.client.load()).state?.models["m"]?.tokensUsed).toBe(6n);
  });

  it("refuses an update that would overfill a pool", async () => {
    await startLocalFile("immediate");
    const members = (list: string) => Array.from({ length: 60_000 }, (_, index) => `${list}-${index}`);
    await running!.client.updateState({ pools: [{ id: "p", set: { activeModels: members("a") }, setFields: { paths: ["active_models"] } }] });

    const error = await expectCallError(
      running!.client.updateState({ pools: [{ id: "p", set: { standbyModels: members("s") }, setFields: { paths: ["standby_models"] } }] }),
    );
    expect(error.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(error.details).toContain("120000 models, over the limit of 100000");
  });
});

describe("WatchState on the memory connector", () => {
  it("sends every change of a large Save", async () => {
    running = await startInProcessDaemon("storage:\n  connector: modelmesh.memory.v1\n  persistence: { sync_policy: immediate }\n");
    const stream = running.client.watchState({ kinds: [EntityKind.MODEL] });
    await stream.waitFor((message) => message.snapshot?.last === true, 5000, "the snapshot");

    await running.client.save({ state: sampleState({ models: 2000 }) });
    await waitFor(
      () => stream.messages.filter((message) => !message.snapshot).flatMap((message) => message.changes).length >= 2000,
      10_000,
      "2000 model changes",
    );
    const ids = stream.messages.filter((message) => !message.snapshot).flatMap((message) => message.changes.map((change) => change.id));
    expect(new Set(ids).size).toBe(2000);
    stream.call.cancel();
  });


  it("streams a snapshot, then changes, and resumes", async () => {
    running = await startInProcessDaemon("storage:\n  connector: modelmesh.memory.v1\n  persistence: { sync_policy: immediate }\n");
    const client = running.client;
    await client.updateState({ models: [{ id: "a", add: { tokensUsed: 1n } }] });

    const stream = client.watchState();
    const snapshot = await stream.waitFor((message) => message.snapshot?.last === true, 5000, "the snapshot");
    expect(snapshot.changes.map((change) => change.id)).toEqual(["a"]);
    const second = await client.updateState({ models: [{ id: "b", add: { tokensUsed: 1n } }] });
    const change = await stream.waitFor((message) => message.changes.some((entry) => entry.id === "b"), 5000, "b");
    expect(change.revision).toBe(second.revision);
    stream.call.cancel();

    const third = await client.updateState({ providers: [{ id: "p", add: { totalCost: 1 } }] });
    const resumed = client.watchState({ startAfterRevision: second.revision, kinds: [EntityKind.PROVIDER] });
    const next = await resumed.waitFor((message) => message.changes.length > 0, 5000, "the provider change");
    expect(next.snapshot).toBeUndefined();
    expect(next.changes.map((entry) => [entry.id, entry.revision])).toEqual([["p", third.revision]]);
    resumed.call.cancel();

    const stale = client.watchState({ startAfterRevision: 999_999n });
    const resync = await stale.waitFor((message) => message.snapshot?.last === true, 5000, "a resync");
    expect(resync.snapshot?.resync).toBe(true);
    stale.call.cancel();
  });
});
