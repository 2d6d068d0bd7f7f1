import { spawn } from "node:child_process";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import { afterEach, describe, expect, inject, it } from "vitest";
import type { WatchSyncStatusResponse } from "../../src/gen/modelmesh/state/v1/state_manager_service_pb.js";
import { EtcdProcess } from "../harness/etcd.js";
import {
  etcdConfigYaml,
  startInProcessDaemon,
  uniquePrefix,
  waitFor,
  type InProcessDaemon,
} from "../harness/in-process-daemon.js";
import { StateClient } from "../harness/state-client.js";
import { sampleState } from "../harness/sample-state.js";

const subscriberScript = fileURLToPath(new URL("../fixtures/open-status-streams.mjs", import.meta.url));
const started: InProcessDaemon[] = [];
let privateEtcd: EtcdProcess | undefined;

afterEach(async () => {
  await Promise.all(started.splice(0).map((running) => running.stop()));
  await privateEtcd?.stop();
  privateEtcd = undefined;
});

async function start(configYaml: string): Promise<InProcessDaemon> {
  const running = await startInProcessDaemon(configYaml);
  started.push(running);
  return running;
}

type Update = WatchSyncStatusResponse;

describe("WatchSyncStatus", () => {
  it("sends the status at once, then each change", async () => {
    const running = await start(etcdConfigYaml(inject("etcdEndpoint"), "periodic", { syncInterval: "1h" }));
    const stream = running.client.watchSyncStatus();
    const pendingIs = (count: bigint) => (update: Update) => update.status?.pendingChanges === count;

    const first = await stream.waitFor(() => true, 5000, "the initial status");
    expect(first.status?.pendingChanges).toBe(0n);
    expect(first.status?.connector).toBe("modelmesh.etcd.v1");

    await running.client.save({ state: sampleState() });
    await stream.waitFor(pendingIs(1n), 5000, "pending_changes 1 after Save");

    const lastSyncBefore = stream.messages.at(-1)?.status?.lastSync?.seconds;
    await new Promise((resolve) => setTimeout(resolve, 1100));
    await running.client.sync();
    const synced = await stream.waitFor(
      (update) => update.status?.pendingChanges === 0n && update.status.lastSync?.seconds !== lastSyncBefore,
      5000,
      "a sync",
    );
    expect(synced.status?.lastSync).toBeDefined();

    const lock = (await running.client.acquireLock({ owner: "router-a" })).lock!;
    const locked = await stream.waitFor((update) => update.status?.locked === true, 5000, "the lock taken");
    expect(locked.status?.lockOwner).toBe("router-a");
    await running.client.releaseLock({ lock });
    const unlocked = await stream.waitFor(
      (update) => update.status?.locked === false && stream.messages.indexOf(update) > stream.messages.indexOf(locked),
      5000,
      "the lock released",
    );
    expect(unlocked.status?.lockOwner).toBeUndefined();
    stream.call.cancel();
  });

  it("shows a lock taken through another daemon", async () => {
    const prefix = uniquePrefix("watch-lock");
    const watched = await start(etcdConfigYaml(inject("etcdEndpoint"), "immediate", { prefix }));
    const other = await start(etcdConfigYaml(inject("etcdEndpoint"), "immediate", { prefix }));
    const stream = watched.client.watchSyncStatus();
    await stream.waitFor(() => true, 5000, "the initial status");

    const lock = (await other.client.acquireLock({ owner: "router-on-other-daemon" })).lock!;
    const locked = await stream.waitFor((update) => update.status?.locked === true, 5000, "the remote lock");
    expect(locked.status?.lockOwner).toBe("router-on-other-daemon");
    expect((await watched.client.getSyncStatus()).status?.lockOwner).toBe("router-on-other-daemon");
    await other.client.releaseLock({ lock });
    await stream.waitFor((update) => update.status?.locked === false && update !== stream.messages[0], 5000, "release");
    stream.call.cancel();
  });

  it("reports the backend going away and coming back", async () => {
    privateEtcd = await EtcdProcess.start();
    const running = await start(etcdConfigYaml(privateEtcd.endpoint, "periodic", { syncInterval: "1h" }));
    const stream = running.client.watchSyncStatus();
    await stream.waitFor((update) => update.status?.backendReachable === true, 10_000, "a reachable backend");

    await privateEtcd.kill();
    const down = await stream.waitFor((update) => update.status?.backendReachable === false, 15_000, "unreachable");
    await privateEtcd.resume();
    await stream.waitFor(
      (update) => update.status?.backendReachable === true && stream.messages.indexOf(update) > stream.messages.indexOf(down),
      15_000,
      "reachable again",
    );
    stream.call.cancel();
  });

  it("gives a stalled reader the latest status, not a queue", async () => {
    const running = await start("storage:\n  connector: modelmesh.memory.v1\n  persistence: { sync_policy: periodic, sync_interval: 1h }\n");
    const stream = running.client.watchSyncStatus();
    await stream.waitFor(() => true, 5000, "the initial status");
    stream.call.pause();

    const saves = 3000;
    const state = sampleState({ models: 1 });
    for (let index = 0; index < saves; index++) await running.client.save({ state });
    stream.call.resume();

    const last = await stream.waitFor(
      (update) => update.status?.pendingChanges === BigInt(saves),
      10_000,
      "the latest pending count",
    );
    expect(last).toBeDefined();
    console.log(`stalled reader received ${stream.messages.length} messages for ${saves} changes`);
    expect(stream.messages.length).toBeLessThan(saves);
    stream.call.cancel();
  });

  it("releases a thousand subscribers that disconnect", async () => {
    const running = await start("storage:\n  connector: modelmesh.memory.v1\n");
    const client = new StateClient(running.daemon.address);
    const cancelled = Array.from({ length: 500 }, () => client.watchSyncStatus());
    // The other 500 belong to a process that is killed, as a crashed router's streams are.
    const vanishing = spawn(process.execPath, [subscriberScript, running.daemon.address, "500"], {
      stdio: ["ignore", "pipe", "inherit"],
    });
    await new Promise<void>((resolve, reject) => {
      vanishing.stdout.on("data", (chunk: Buffer) => chunk.toString().includes("open") && resolve());
      vanishing.once("exit", (code) => reject(new Error(`subscriber process exited with ${code}`)));
    });
    await waitFor(() => running.daemon.statusSubscriberCount === 1000, 20_000, "1000 subscribers");

    for (const stream of cancelled) stream.call.cancel();
    vanishing.kill("SIGKILL");
    await waitFor(() => running.daemon.statusSubscriberCount === 0, 20_000, "zero subscribers");
    expect(running.daemon.statusSubscriberCount).toBe(0);
    client.close();
  });

  it("ends every stream with UNAVAILABLE at shutdown", async () => {
    const running = await startInProcessDaemon("storage:\n  connector: modelmesh.memory.v1\n");
    const stream = running.client.watchSyncStatus();
    await stream.waitFor(() => true, 5000, "the initial status");

    const stopping = running.daemon.shutdown("test");
    const status = await stream.ended(10_000);
    expect(status.code).toBe(grpc.status.UNAVAILABLE);
    expect(status.details).toContain("shutting down");
    expect(await stopping).toBe(0);
    running.client.close();
  });
});
