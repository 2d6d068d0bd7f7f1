import { equals } from "@bufbuild/protobuf";
import { afterEach, describe, expect, inject, it } from "vitest";
import { SystemStateSchema, type SystemState } from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { DaemonProcess } from "../harness/daemon-process.js";
import { etcdConfigYaml } from "../harness/in-process-daemon.js";
import { StateClient } from "../harness/state-client.js";
import { sampleState } from "../harness/sample-state.js";

/**
 * Each case saves a first state, restarts gracefully so that every policy
 * that persists has it, saves a second state, ends the daemon with the given
 * signal, and checks which state a new daemon on the same etcd prefix loads.
 */
const cases: Array<{ policy: string; signal: NodeJS.Signals; survives: "none" | "first" | "second" }> = [
  { policy: "in-memory", signal: "SIGTERM", survives: "none" },
  { policy: "sync-on-boundary", signal: "SIGTERM", survives: "second" },
  { policy: "sync-on-boundary", signal: "SIGKILL", survives: "first" },
  { policy: "periodic", signal: "SIGTERM", survives: "second" },
  { policy: "periodic", signal: "SIGKILL", survives: "first" },
  { policy: "immediate", signal: "SIGTERM", survives: "second" },
  { policy: "immediate", signal: "SIGKILL", survives: "second" },
];

afterEach(async () => {
  await DaemonProcess.killAll();
});

async function withClient<T>(daemon: DaemonProcess, use: (client: StateClient) => Promise<T>): Promise<T> {
  const client = new StateClient(daemon.address);
  try {
    return await use(client);
  } finally {
    client.close();
  }
}

function expectState(actual: SystemState | undefined, expected: SystemState): void {
  expect(actual).toBeDefined();
  expect(equals(SystemStateSchema, actual!, expected)).toBe(true);
}

describe("restart persistence", () => {
  it.each(cases)("$policy after $signal keeps the $survives state", async ({ policy, signal, survives }) => {
    const configYaml = etcdConfigYaml(inject("etcdEndpoint"), policy, { syncInterval: "1h" });
    const first = sampleState({ models: 20, tokensUsed: 1n });
    const second = sampleState({ models: 30, tokensUsed: 2n });

    const daemonA = await DaemonProcess.start({ configYaml });
    await withClient(daemonA, (client) => client.save({ state: first }));
    expect(await daemonA.stop("SIGTERM")).toBe(0);

    const daemonB = await DaemonProcess.start({ configYaml });
    await withClient(daemonB, (client) => client.save({ state: second }));
    if (signal === "SIGKILL") await daemonB.kill();
    else expect(await daemonB.stop(signal)).toBe(0);

    const daemonC = await DaemonProcess.start({ configYaml });
    const loaded = await withClient(daemonC, async (client) => (await client.load()).state);
    if (survives === "none") expect(loaded).toBeUndefined();
    if (survives === "first") expectState(loaded, first);
    if (survives === "second") expectState(loaded, second);
  });
});
