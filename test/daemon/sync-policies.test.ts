import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { equals } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { pino } from "pino";
import { afterEach, describe, expect, inject, it } from "vitest";
import { SystemStateSchema, SyncPolicy, type SystemState } from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { EtcdConnector } from "../../src/storage/etcd-connector.js";
import { LocalFileConnector } from "../../src/storage/local-file-connector.js";
import { startInProcessDaemon, uniquePrefix, waitFor, type InProcessDaemon } from "../harness/in-process-daemon.js";
import { sampleState } from "../harness/sample-state.js";

const silent = pino({ level: "silent" });

/** A storage backend under test: the YAML that selects it, and a way to read what it stored. */
interface Backend {
  name: string;
  yaml: string;
  /** Reads the stored snapshot with a fresh connector. Undefined for memory, which no other process can read. */
  readStored?: () => Promise<SystemState | undefined>;
  cleanup(): Promise<void>;
}

async function localFileBackend(): Promise<Backend> {
  const folder = await mkdtemp(join(tmpdir(), "modelmesh-policy-"));
  const path = join(folder, "state.bin");
  return {
    name: "local-file",
    yaml: `storage:\n  connector: modelmesh.local-file.v1\n  local_file:\n    path: ${JSON.stringify(path)}\n`,
    readStored: async () => await new LocalFileConnector(path, silent).load(),
    cleanup: async () => await rm(folder, { recursive: true, force: true }),
  };
}

async function etcdBackend(): Promise<Backend> {
  const endpoint = inject("etcdEndpoint");
  const prefix = uniquePrefix("policy");
  return {
    name: "etcd",
    yaml: `storage:\n  connector: modelmesh.etcd.v1\n  etcd:\n    endpoints: [${JSON.stringify(endpoint)}]\n    prefix: ${prefix}\n`,
    readStored: async () => {
      const connector = await EtcdConnector.open({ endpoints: [endpoint], prefix, requestTimeoutMs: 5000 }, silent);
      try {
        return await connector.load();
      } finally {
        await connector.close();
      }
    },
    cleanup: async () => {},
  };
}

async function memoryBackend(): Promise<Backend> {
  return { name: "memory", yaml: "storage:\n  connector: modelmesh.memory.v1\n", cleanup: async () => {} };
}

const backends = [
  { name: "memory", makeBackend: memoryBackend },
  { name: "local-file", makeBackend: localFileBackend },
  { name: "etcd", makeBackend: etcdBackend },
];

function withPolicy(backend: Backend, policy: string, interval = "1h"): string {
  return `${backend.yaml}  persistence:\n    sync_policy: ${policy}\n    sync_interval: ${interval}\n`;
}

function expectSameState(actual: SystemState | undefined, expected: SystemState): void {
  expect(actual).toBeDefined();
  expect(equals(SystemStateSchema, actual!, expected)).toBe(true);
}

let running: InProcessDaemon | undefined;
let backend: Backend | undefined;

afterEach(async () => {
  await running?.stop();
  await backend?.cleanup();
  running = undefined;
  backend = undefined;
});

describe.each(backends)("sync policies on $name", ({ makeBackend }) => {
  it("in-memory keeps saves in the daemon and never writes them", async () => {
    backend = await makeBackend();
    running = await startInProcessDaemon(withPolicy(backend, "in-memory"));
    const state = sampleState();

    const saved = await running.client.save({ state });
    expect(saved.status?.policy).toBe(SyncPolicy.IN_MEMORY);
    expect(saved.status?.pendingChanges).toBe(1n);
    expectSameState((await running.client.load()).state, state);

    const synced = await running.client.sync();
    expect(synced.status?.pendingChanges).toBe(1n);
    expect(synced.status?.lastSync).toBeUndefined();
    await running.stop();
    running = undefined;
    expect(await backend.readStored?.()).toBeUndefined();
  });

  it("sync-on-boundary writes only at shutdown", async () => {
    backend = await makeBackend();
    running = await startInProcessDaemon(withPolicy(backend, "sync-on-boundary"));
    const state = sampleState();

    const saved = await running.client.save({ state });
    expect(saved.status?.pendingChanges).toBe(1n);
    expect(saved.status?.nextSync).toBeUndefined();
    const synced = await running.client.sync();
    expect(synced.status?.pendingChanges).toBe(1n);
    expect(await backend.readStored?.()).toBeUndefined();

    expect(await running.stop()).toBe(0);
    running = undefined;
    if (backend.readStored !== undefined) expectSameState(await backend.readStored(), state);
  });

  it("periodic writes on Sync and reports the next sync", async () => {
    backend = await makeBackend();
    running = await startInProcessDaemon(withPolicy(backend, "periodic", "1h"));
    const state = sampleState();

    const before = await running.client.getSyncStatus();
    const nextSync = timestampDate(before.status!.nextSync!).getTime();
    expect(nextSync).toBeGreaterThan(Date.now() + 3_500_000);
    const saved = await running.client.save({ state });
    expect(saved.status?.pendingChanges).toBe(1n);
    expect(await backend.readStored?.()).toBeUndefined();

    const synced = await running.client.sync();
    expect(synced.status?.pendingChanges).toBe(0n);
    expect(synced.status?.lastSync).toBeDefined();
    if (backend.readStored !== undefined) expectSameState(await backend.readStored(), state);
  });

  it("periodic flushes changed state every interval", async () => {
    backend = await makeBackend();
    running = await startInProcessDaemon(withPolicy(backend, "periodic", "200ms"));
    const state = sampleState({ tokensUsed: 42n });
    const client = running.client;

    await client.save({ state });
    await waitFor(async () => (await client.getSyncStatus()).status?.pendingChanges === 0n, 10_000, "a periodic flush");
    if (backend.readStored !== undefined) expectSameState(await backend.readStored(), state);
  });

  it("immediate commits before Save returns", async () => {
    backend = await makeBackend();
    running = await startInProcessDaemon(withPolicy(backend, "immediate"));
    const state = sampleState();

    const saved = await running.client.save({ state });
    expect(saved.status?.policy).toBe(SyncPolicy.IMMEDIATE);
    expect(saved.status?.pendingChanges).toBe(0n);
    expect(saved.status?.lastSync).toBeDefined();
    if (backend.readStored !== undefined) expectSameState(await backend.readStored(), state);
    expectSameState((await running.client.load()).state, state);
  });

  it("Load returns no state before the first Save", async () => {
    backend = await makeBackend();
    running = await startInProcessDaemon(withPolicy(backend, "immediate"));

    const loaded = await running.client.load();
    expect(loaded.state).toBeUndefined();
    const status = (await running.client.getSyncStatus()).status;
    expect(status?.pendingChanges).toBe(0n);
    expect(status?.locked).toBe(false);
  });
});
