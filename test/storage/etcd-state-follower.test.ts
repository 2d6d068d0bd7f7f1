import { TcpProxy } from "../harness/tcp-proxy.js";
import { Writable } from "node:stream";
import { clone, create, equals, toBinary } from "@bufbuild/protobuf";
import { status as GrpcStatus } from "@grpc/grpc-js";
import { noop } from "cockatiel";
import { Etcd3 } from "etcd3";
import { pino, type Logger } from "pino";
import { afterAll, afterEach, describe, expect, inject, it } from "vitest";
import { EntityKind } from "../../src/gen/modelmesh/state/v1/changes_pb.js";
import {
  ModelStateSchema,
  PoolStateSchema,
  ProviderStateSchema,
  SystemStateSchema,
  type ModelState,
  type SystemState,
} from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { ServiceError } from "../../src/server/service-error.js";
import type { EntityEvent } from "../../src/state/entity.js";
import { EtcdConnector } from "../../src/storage/etcd-connector.js";
import { SnapshotLayout, newGenerationId, parseCurrentPointer } from "../../src/storage/etcd-snapshot-layout.js";
import { EtcdStateFollower, type FollowerHandlers } from "../../src/storage/etcd-state-follower.js";
import { EtcdProcess } from "../harness/etcd.js";
import { uniquePrefix, waitFor } from "../harness/in-process-daemon.js";
import { sampleState } from "../harness/sample-state.js";

/** Everything a follower handed to its handlers, in order. */
interface Recording {
  snapshots: Array<{ state: SystemState | undefined; revision: bigint; resync: boolean }>;
  batches: Array<{ revision: bigint; events: EntityEvent[] }>;
  progress: bigint[];
}

function recordingHandlers(): { handlers: FollowerHandlers; recording: Recording } {
  const recording: Recording = { snapshots: [], batches: [], progress: [] };
  const handlers: FollowerHandlers = {
    onSnapshot: (state, revision, resync) => recording.snapshots.push({ state, revision, resync }),
    onEvents: (events, revision) => recording.batches.push({ revision, events }),
    onProgress: (revision) => recording.progress.push(revision),
  };
  return { handlers, recording };
}

/** JSON log lines, so tests can check what the follower logged. */
function captureLogger(level = "info"): { logger: Logger; lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      lines.push(JSON.parse(chunk.toString("utf8")) as Record<string, unknown>);
      done();
    },
  });
  return { logger: pino({ level }, stream), lines };
}

const silentLogger = pino({ level: "silent" });

/** Creates a client like the connector's: one attempt per call, a deadline on each unary call. */
function newClient(endpoint: string, requestTimeoutMs = 5000): Etcd3 {
  return new Etcd3({
    hosts: endpoint,
    defaultCallOptions: (context) => (context.isStream ? {} : { deadline: Date.now() + requestTimeoutMs }),
    faultHandling: { host: () => noop, global: noop },
  });
}

/** Returns the generation that `current` names and the revision that last wrote it. */
async function readPointer(client: Etcd3, prefix: string): Promise<{ generation: string; revision: bigint }> {
  const response = await client.kv.range({ key: new SnapshotLayout(prefix).currentKey });
  const entry = response.kvs[0];
  if (entry === undefined) throw new Error(`"${prefix}/current" is missing`);
  return { generation: parseCurrentPointer(entry.value, `${prefix}/current`).generation, revision: BigInt(entry.mod_revision) };
}

/**
 * Writes one model under `generation` the way the per-entity writer does:
 * the entity key and the generation's `last-change` marker in one
 * transaction. Returns the transaction's revision.
 */
async function putModel(client: Etcd3, prefix: string, generation: string, id: string, value: Uint8Array): Promise<bigint> {
  const response = await client.kv.txn({
    success: [
      { request_put: { key: new SnapshotLayout(prefix).entityKey(generation, "models", id), value: Buffer.from(value) } },
      { request_put: { key: Buffer.from(`${prefix}/generations/${generation}/last-change`), value: Buffer.from(id) } },
    ],
  });
  return BigInt(response.header.revision);
}

async function deleteModel(client: Etcd3, prefix: string, generation: string, id: string): Promise<bigint> {
  const response = await client.kv.txn({
    success: [
      { request_delete_range: { key: new SnapshotLayout(prefix).entityKey(generation, "models", id) } },
      { request_put: { key: Buffer.from(`${prefix}/generations/${generation}/last-change`), value: Buffer.from(id) } },
    ],
  });
  return BigInt(response.header.revision);
}

function modelBytes(tokensUsed: bigint): Uint8Array {
  return toBinary(ModelStateSchema, create(ModelStateSchema, { tokensUsed }));
}

/** Returns the events of every batch, with the batch revision checked against each event's. */
function allEvents(recording: Recording): EntityEvent[] {
  for (const batch of recording.batches) {
    for (const event of batch.events) expect(event.revision).toBe(batch.revision);
  }
  return recording.batches.flatMap((batch) => batch.events);
}

/** Applies recorded events to a snapshot, as a consumer of the follower would. */
function replay(snapshot: SystemState | undefined, batches: Recording["batches"]): SystemState {
  const state = snapshot === undefined ? create(SystemStateSchema) : clone(SystemStateSchema, snapshot);
  for (const { events } of batches) {
    for (const event of events) {
      let folder: Record<string, unknown> = state.pools;
      if (event.kind === EntityKind.MODEL) folder = state.models;
      if (event.kind === EntityKind.PROVIDER) folder = state.providers;
      if (event.value === undefined) delete folder[event.id];
      else folder[event.id] = event.value;
    }
  }
  return state;
}

/** Compares entity maps only: the snapshot timestamp does not travel in events. */
function expectSameEntities(actual: SystemState | undefined, expected: SystemState): void {
  expect(actual).toBeDefined();
  expect(Object.keys(actual!.models).sort()).toEqual(Object.keys(expected.models).sort());
  expect(Object.keys(actual!.providers).sort()).toEqual(Object.keys(expected.providers).sort());
  expect(Object.keys(actual!.pools).sort()).toEqual(Object.keys(expected.pools).sort());
  for (const [id, model] of Object.entries(expected.models)) {
    expect(equals(ModelStateSchema, actual!.models[id]!, model), `model ${id}`).toBe(true);
  }
  for (const [id, provider] of Object.entries(expected.providers)) {
    expect(equals(ProviderStateSchema, actual!.providers[id]!, provider), `provider ${id}`).toBe(true);
  }
  for (const [id, pool] of Object.entries(expected.pools)) {
    expect(equals(PoolStateSchema, actual!.pools[id]!, pool), `pool ${id}`).toBe(true);
  }
}

async function expectUnavailable(promise: Promise<unknown>): Promise<ServiceError> {
  const error: unknown = await promise.then(
    () => undefined,
    (rejection: unknown) => rejection,
  );
  expect(error).toBeInstanceOf(ServiceError);
  expect((error as ServiceError).code).toBe(GrpcStatus.UNAVAILABLE);
  return error as ServiceError;
}

const waitTimeoutMs = 20_000;

describe("EtcdStateFollower on the shared etcd", () => {
  const endpoint = inject("etcdEndpoint");
  const raw = newClient(endpoint);
  const followers: EtcdStateFollower[] = [];
  const connectors: EtcdConnector[] = [];

  async function openConnector(prefix: string): Promise<EtcdConnector> {
    const connector = await EtcdConnector.open({ endpoints: [endpoint], prefix, requestTimeoutMs: 10_000 }, silentLogger);
    connectors.push(connector);
    return connector;
  }

  async function startFollower(prefix: string, handlers: FollowerHandlers, logger: Logger = silentLogger) {
    const follower = await EtcdStateFollower.start(
      { client: raw, prefix, endpoints: [endpoint], requestTimeoutMs: 10_000 },
      logger,
      handlers,
    );
    followers.push(follower);
    return follower;
  }

  afterEach(async () => {
    await Promise.all(followers.splice(0).map((follower) => follower.close()));
    await Promise.all(connectors.splice(0).map((connector) => connector.close()));
  });

  afterAll(() => {
    raw.close();
  });

  it("start on an empty prefix, then a first save", async () => {
    const prefix = uniquePrefix("state-follower");
    const { handlers, recording } = recordingHandlers();
    const follower = await startFollower(prefix, handlers);

    expect(recording.snapshots).toHaveLength(1);
    expect(recording.snapshots[0]!.state).toBeUndefined();
    expect(recording.snapshots[0]!.resync).toBe(false);
    expect(recording.snapshots[0]!.revision).toBeGreaterThan(0n);
    expect(follower.revision).toBe(recording.snapshots[0]!.revision);

    const state = sampleState({ models: 3 });
    const connector = await openConnector(prefix);
    await connector.save(state);
    const flip = await readPointer(raw, prefix);
    await follower.waitForRevision(flip.revision, AbortSignal.timeout(waitTimeoutMs));

    expect(recording.batches).toHaveLength(1);
    expect(recording.batches[0]!.revision).toBe(flip.revision);
    const events = allEvents(recording);
    expect(events).toHaveLength(3 + 2 + 1);
    expectSameEntities(replay(undefined, recording.batches), state);
    expect(recording.progress.at(-1)).toBeGreaterThanOrEqual(flip.revision);
  });

  it("save that changes, removes and adds one model", async () => {
    const prefix = uniquePrefix("state-follower");
    const connector = await openConnector(prefix);
    const first = sampleState({ models: 3 });
    await connector.save(first);
    const { handlers, recording } = recordingHandlers();
    const follower = await startFollower(prefix, handlers);
    expectSameEntities(recording.snapshots[0]!.state, first);

    const second = clone(SystemStateSchema, first);
    second.models["model-000000"]!.tokensUsed = 42n;
    delete second.models["model-000001"];
    second.models["model-new"] = create(ModelStateSchema, { tokensUsed: 7n });
    await connector.save(second);
    const flip = await readPointer(raw, prefix);
    await follower.waitForRevision(flip.revision, AbortSignal.timeout(waitTimeoutMs));

    expect(recording.batches).toHaveLength(1);
    expect(recording.batches[0]!.revision).toBe(flip.revision);
    const byId = new Map(allEvents(recording).map((event) => [event.id, event]));
    expect(byId.size).toBe(3);
    expect((byId.get("model-000000")?.value as ModelState | undefined)?.tokensUsed).toBe(42n);
    expect(byId.get("model-000001")?.value).toBeUndefined();
    expect(byId.has("model-000001")).toBe(true);
    expect((byId.get("model-new")?.value as ModelState | undefined)?.tokensUsed).toBe(7n);
    for (const event of byId.values()) expect(event.kind).toBe(EntityKind.MODEL);
  });

  it("direct entity writes and staging writes", async () => {
    const prefix = uniquePrefix("state-follower");
    const connector = await openConnector(prefix);
    await connector.save(sampleState({ models: 3 }));
    const { generation } = await readPointer(raw, prefix);
    const { handlers, recording } = recordingHandlers();
    const follower = await startFollower(prefix, handlers);

    const putRevision = await putModel(raw, prefix, generation, "direct/with-slash", modelBytes(5n));
    const deleteRevision = await deleteModel(raw, prefix, generation, "model-000001");
    await follower.waitForRevision(deleteRevision, AbortSignal.timeout(waitTimeoutMs));

    expect(recording.batches.map((batch) => batch.revision)).toEqual([putRevision, deleteRevision]);
    const [put, removal] = allEvents(recording);
    expect(put).toMatchObject({ revision: putRevision, kind: EntityKind.MODEL, id: "direct/with-slash" });
    expect((put!.value as ModelState).tokensUsed).toBe(5n);
    expect(removal).toEqual({ revision: deleteRevision, kind: EntityKind.MODEL, id: "model-000001", value: undefined });

    // A save in progress: staging keys and entity keys under a generation that is not current.
    const staged = newGenerationId();
    const layout = new SnapshotLayout(prefix);
    await raw.kv.put({ key: layout.stagingKey(staged), value: Buffer.from("now") });
    await putModel(raw, prefix, staged, "model-000000", modelBytes(99n));
    const stagedDelete = await deleteModel(raw, prefix, staged, "model-000000");
    await follower.waitForRevision(stagedDelete, AbortSignal.timeout(waitTimeoutMs));

    expect(recording.batches).toHaveLength(2);
    expect(recording.progress.at(-1)).toBe(stagedDelete);
    expect(follower.revision).toBe(stagedDelete);
  });

  it("undecodable value is logged and skipped", async () => {
    const prefix = uniquePrefix("state-follower");
    const connector = await openConnector(prefix);
    await connector.save(sampleState({ models: 1 }));
    const { generation } = await readPointer(raw, prefix);
    const { handlers, recording } = recordingHandlers();
    const { logger, lines } = captureLogger();
    const follower = await startFollower(prefix, handlers, logger);

    // Wire type 7 does not exist, so no decoder accepts this byte.
    const badRevision = await putModel(raw, prefix, generation, "broken", Buffer.from([0x0f]));
    const goodRevision = await putModel(raw, prefix, generation, "fine", modelBytes(3n));
    await follower.waitForRevision(goodRevision, AbortSignal.timeout(waitTimeoutMs));

    expect(badRevision).toBeLessThan(goodRevision);
    expect(recording.batches.map((batch) => batch.revision)).toEqual([goodRevision]);
    const warning = lines.find((line) => line["level"] === 40 && line["key"] === `${prefix}/generations/${generation}/models/broken`);
    expect(warning?.["msg"]).toBe("cannot decode model from etcd, skipping the key");

    // Deleting the undecodable key removes nothing the handlers knew of.
    const deleteRevision = await deleteModel(raw, prefix, generation, "broken");
    await follower.waitForRevision(deleteRevision, AbortSignal.timeout(waitTimeoutMs));
    expect(recording.batches).toHaveLength(1);
  });

  it("unreadable or deleted pointer", async () => {
    const prefix = uniquePrefix("state-follower");
    const connector = await openConnector(prefix);
    const state = sampleState({ models: 2 });
    await connector.save(state);
    const { handlers, recording } = recordingHandlers();
    const { logger, lines } = captureLogger();
    const follower = await startFollower(prefix, handlers, logger);
    const currentKey = new SnapshotLayout(prefix).currentKey;

    // An unreadable pointer is logged, and the handlers keep the state they have.
    const garbled = await raw.kv.put({ key: currentKey, value: Buffer.from("not json") });
    await follower.waitForRevision(BigInt(garbled.header.revision), AbortSignal.timeout(waitTimeoutMs));
    expect(recording.batches).toHaveLength(0);
    const warning = lines.find((line) => line["msg"] === "cannot parse the current pointer, ignoring entity keys until the next save");
    expect(warning?.["level"]).toBe(40);
    expect(warning?.["key"]).toBe(`${prefix}/current`);

    // Deleting the pointer removes every entity.
    const deleted = await raw.kv.deleteRange({ key: currentKey });
    const deleteRevision = BigInt(deleted.header.revision);
    await follower.waitForRevision(deleteRevision, AbortSignal.timeout(waitTimeoutMs));
    expect(recording.batches).toHaveLength(1);
    expect(recording.batches[0]!.revision).toBe(deleteRevision);
    expect(recording.batches[0]!.events).toHaveLength(2 + 2 + 1);
    for (const event of recording.batches[0]!.events) expect(event.value).toBeUndefined();

    // The next save brings every entity back.
    await connector.save(state);
    const flip = await readPointer(raw, prefix);
    await follower.waitForRevision(flip.revision, AbortSignal.timeout(waitTimeoutMs));
    expect(recording.batches).toHaveLength(2);
    expect(recording.batches[1]!.events).toHaveLength(2 + 2 + 1);
    expectSameEntities(replay(recording.snapshots[0]!.state, recording.batches), state);
  });

  it("handler that throws does not stop the follower", async () => {
    const prefix = uniquePrefix("state-follower");
    const connector = await openConnector(prefix);
    await connector.save(sampleState({ models: 1 }));
    const { generation } = await readPointer(raw, prefix);
    const revisions: bigint[] = [];
    const follower = await startFollower(prefix, {
      onSnapshot: () => undefined,
      onEvents: (_events, revision) => {
        revisions.push(revision);
        throw new Error("handler failure");
      },
    });

    const first = await putModel(raw, prefix, generation, "a", modelBytes(1n));
    const second = await putModel(raw, prefix, generation, "b", modelBytes(2n));
    await follower.waitForRevision(second, AbortSignal.timeout(waitTimeoutMs));

    expect(revisions).toEqual([first, second]);
  });

  it("save of 10,000 models", async () => {
    const prefix = uniquePrefix("state-follower");
    const { handlers, recording } = recordingHandlers();
    const { logger, lines } = captureLogger();
    const follower = await startFollower(prefix, handlers, logger);
    const connector = await openConnector(prefix);

    const first = sampleState({ models: 10_000, tokensUsed: 1n });
    let startedAt = performance.now();
    await connector.save(first);
    const firstSaveMs = performance.now() - startedAt;
    startedAt = performance.now();
    const firstFlip = await readPointer(raw, prefix);
    await follower.waitForRevision(firstFlip.revision, AbortSignal.timeout(60_000));
    const firstCatchUpMs = performance.now() - startedAt;

    expect(recording.batches).toHaveLength(1);
    expect(recording.batches[0]!.revision).toBe(firstFlip.revision);
    expect(allEvents(recording)).toHaveLength(10_000 + 2 + 2);
    expectSameEntities(replay(undefined, recording.batches), first);

    // Every model changes, and the commit deletes the 10,000 keys of the first generation in the same revision.
    const second = sampleState({ models: 10_000, tokensUsed: 2n });
    startedAt = performance.now();
    await connector.save(second);
    const secondSaveMs = performance.now() - startedAt;
    startedAt = performance.now();
    const secondFlip = await readPointer(raw, prefix);
    await follower.waitForRevision(secondFlip.revision, AbortSignal.timeout(60_000));
    const secondCatchUpMs = performance.now() - startedAt;

    expect(recording.batches).toHaveLength(2);
    expect(recording.batches[1]!.revision).toBe(secondFlip.revision);
    expect(recording.batches[1]!.events).toHaveLength(10_000);
    expectSameEntities(replay(undefined, recording.batches), second);

    const applied = lines.filter((line) => line["msg"] === "state follower applied a save").map((line) => line["durationMs"]);
    console.log(
      `10,000 models: first save ${Math.round(firstSaveMs)} ms, follower done ${Math.round(firstCatchUpMs)} ms later ` +
        `(generation read and diff ${String(applied[0])} ms); second save ${Math.round(secondSaveMs)} ms, follower done ` +
        `${Math.round(secondCatchUpMs)} ms later (generation read and diff ${String(applied[1])} ms)`,
    );
  });

  it("waitForRevision follows another client's write", async () => {
    const prefix = uniquePrefix("state-follower");
    const { handlers, recording } = recordingHandlers();
    const follower = await startFollower(prefix, handlers);

    // A key that is neither `current` nor an entity, like a lock queue key.
    const response = await raw.kv.put({ key: Buffer.from(`${prefix}/locks/state/1`), value: Buffer.from("{}") });
    const revision = BigInt(response.header.revision);
    await follower.waitForRevision(revision, AbortSignal.timeout(waitTimeoutMs));

    expect(follower.revision).toBeGreaterThanOrEqual(revision);
    expect(recording.progress).toContain(revision);
    expect(recording.batches).toHaveLength(0);
  });

  it("waitForRevision rejects on abort and on close", async () => {
    const prefix = uniquePrefix("state-follower");
    const { handlers } = recordingHandlers();
    const follower = await startFollower(prefix, handlers);
    const far = follower.revision + 1_000_000n;

    const controller = new AbortController();
    const aborted = follower.waitForRevision(far, controller.signal);
    const reason = new Error("caller gave up");
    controller.abort(reason);
    await expect(aborted).rejects.toBe(reason);

    const pending = follower.waitForRevision(far);
    await follower.close();
    const error = await expectUnavailable(pending);
    expect(error.message).toContain(`revision ${far}`);
    await expectUnavailable(follower.waitForRevision(far));
    await expect(follower.waitForRevision(follower.revision)).resolves.toBeUndefined();
  });
});

describe("EtcdStateFollower with a private etcd", () => {
  /** Starts a private etcd, a proxy in front of it, a follower behind the proxy, and a writer straight to etcd. */
  async function setUp(seed: SystemState | undefined) {
    const etcd = await EtcdProcess.start();
    const proxy = await TcpProxy.start(etcd.clientPort);
    const followerClient = newClient(proxy.endpoint, 2000);
    const writer = newClient(etcd.endpoint);
    const prefix = uniquePrefix("state-follower");
    const connector = await EtcdConnector.open({ endpoints: [etcd.endpoint], prefix, requestTimeoutMs: 10_000 }, silentLogger);
    if (seed !== undefined) await connector.save(seed);
    const { handlers, recording } = recordingHandlers();
    const { logger, lines } = captureLogger("debug");
    const follower = await EtcdStateFollower.start(
      { client: followerClient, prefix, endpoints: [proxy.endpoint], requestTimeoutMs: 2000 },
      logger,
      handlers,
    );
    const tearDown = async (): Promise<void> => {
      await follower.close();
      await connector.close();
      followerClient.close();
      writer.close();
      await proxy.close();
      await etcd.stop();
    };
    /** Cuts the proxy and waits until the follower noticed that its watch is gone. */
    const disconnect = async (): Promise<void> => {
      const before = lines.length;
      proxy.cut();
      await waitFor(
        () => lines.slice(before).some((line) => line["msg"] === "state follower lost its etcd watch, watching again"),
        waitTimeoutMs,
        "the follower to lose its watch",
      );
    };
    return { etcd, proxy, writer, prefix, connector, follower, recording, lines, disconnect, tearDown };
  }

  /** Compacts etcd up to its current revision and returns that revision. */
  async function compactAll(writer: Etcd3, prefix: string): Promise<bigint> {
    const { header } = await writer.kv.range({ key: Buffer.from(`${prefix}/probe`) });
    await writer.kv.compact({ revision: header.revision, physical: true });
    return BigInt(header.revision);
  }

  it("reconnect resumes without a resync, joining fragments", async () => {
    const setup = await setUp(sampleState({ models: 2 }));
    const { writer, prefix, connector, follower, recording, lines } = setup;
    try {
      const { generation } = await readPointer(writer, prefix);
      await setup.disconnect();

      // While the watch is down: a per-entity write, then a save large enough that etcd must
      // split the catch-up response (over its 1.5 MiB --max-request-bytes) into fragments.
      const putRevision = await putModel(writer, prefix, generation, "while-away", modelBytes(11n));
      const big = sampleState({ models: 10_000 });
      const longIds = create(SystemStateSchema, { providers: big.providers, pools: big.pools, timestamp: big.timestamp });
      for (const [id, model] of Object.entries(big.models)) longIds.models[`${id}-${"x".repeat(100)}`] = model;
      await connector.save(longIds);
      const flip = await readPointer(writer, prefix);
      setup.proxy.restore();
      const restoredAt = performance.now();

      await follower.waitForRevision(flip.revision, AbortSignal.timeout(60_000));
      const catchUpMs = performance.now() - restoredAt;

      expect(recording.snapshots).toHaveLength(1);
      expect(recording.batches.map((batch) => batch.revision)).toEqual([putRevision, flip.revision]);
      expectSameEntities(replay(recording.snapshots[0]!.state, recording.batches), longIds);
      const joined = lines.filter((line) => line["msg"] === "joined the fragments of a watch response");
      expect(joined.length).toBeGreaterThan(0);
      expect(joined[0]!["fragments"]).toBeGreaterThan(1);
      console.log(
        `catch-up after reconnect: ${Math.round(catchUpMs)} ms from restoring the connection, ` +
          `fragments per joined response: ${joined.map((line) => String(line["fragments"])).join(", ")}`,
      );
      expect(lines.some((line) => line["msg"] === "state follower watches etcd again")).toBe(true);
    } finally {
      await setup.tearDown();
    }
  });

  it("compaction while disconnected makes a resync", async () => {
    const setup = await setUp(sampleState({ models: 3 }));
    const { writer, prefix, connector, follower, recording, lines } = setup;
    try {
      await setup.disconnect();
      const changed = sampleState({ models: 4, tokensUsed: 9n });
      await connector.save(changed);
      const { generation } = await readPointer(writer, prefix);
      await putModel(writer, prefix, generation, "added-directly", modelBytes(12n));
      changed.models["added-directly"] = create(ModelStateSchema, { tokensUsed: 12n });
      const compacted = await compactAll(writer, prefix);
      setup.proxy.restore();

      await waitFor(() => recording.snapshots.length === 2, waitTimeoutMs, "the resync snapshot");
      const resync = recording.snapshots[1]!;
      expect(resync.resync).toBe(true);
      expect(resync.revision).toBeGreaterThanOrEqual(compacted);
      expectSameEntities(resync.state, changed);
      expect(recording.batches).toHaveLength(0);
      const warning = lines.find((line) => line["msg"] === "state follower lost watch history, reading the whole state again");
      expect(warning?.["level"]).toBe(40);
      expect(String(warning?.["reason"])).toContain("compacted");

      // The new watch delivers later changes.
      const later = await putModel(writer, prefix, generation, "after-resync", modelBytes(13n));
      await follower.waitForRevision(later, AbortSignal.timeout(waitTimeoutMs));
      expect(recording.batches.map((batch) => batch.revision)).toEqual([later]);
      expect(allEvents(recording)[0]).toMatchObject({ id: "after-resync", kind: EntityKind.MODEL });
    } finally {
      await setup.tearDown();
    }
  });

  // etcd accepts a watch that starts exactly at the compaction revision, but that compaction removed the
  // revision's own deletions, so the resumed watch would start without error and never report the delete.
  it("compaction at the resume revision makes a resync", async () => {
    const seed = sampleState({ models: 3 });
    const setup = await setUp(seed);
    const { writer, prefix, follower, recording, lines } = setup;
    try {
      const { generation } = await readPointer(writer, prefix);
      const { header } = await writer.kv.range({ key: Buffer.from(`${prefix}/probe`) });
      expect(follower.revision).toBe(BigInt(header.revision));
      await setup.disconnect();

      const deleteRevision = await deleteModel(writer, prefix, generation, "model-000002");
      expect(deleteRevision).toBe(follower.revision + 1n);
      await writer.kv.compact({ revision: deleteRevision.toString(), physical: true });
      setup.proxy.restore();

      await waitFor(() => recording.snapshots.length === 2, waitTimeoutMs, "the resync snapshot");
      expect(recording.snapshots[1]!.resync).toBe(true);
      const warning = lines.find((line) => line["msg"] === "state follower lost watch history, reading the whole state again");
      expect(warning?.["reason"]).toBe(`etcd compacted revision ${deleteRevision - 1n} before the watch from ${deleteRevision} started`);
      const expected = clone(SystemStateSchema, seed);
      delete expected.models["model-000002"];
      expectSameEntities(recording.snapshots[1]!.state, expected);
    } finally {
      await setup.tearDown();
    }
  });

  it("start rejects with UNAVAILABLE when etcd is down", async () => {
    const etcd = await EtcdProcess.start();
    const client = newClient(etcd.endpoint, 1000);
    try {
      await etcd.kill();
      const error = await expectUnavailable(
        EtcdStateFollower.start(
          { client, prefix: uniquePrefix("state-follower"), endpoints: [etcd.endpoint], requestTimeoutMs: 1000 },
          silentLogger,
          recordingHandlers().handlers,
        ),
      );
      expect(error.message).toContain(etcd.endpoint);
    } finally {
      client.close();
      await etcd.stop();
    }
  });
});
