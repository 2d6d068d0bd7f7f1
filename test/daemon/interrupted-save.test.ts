import { create, equals } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { afterEach, describe, expect, inject, it } from "vitest";
import { SystemStateSchema, type SystemState } from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { DaemonProcess } from "../harness/daemon-process.js";
import { etcdConfigYaml } from "../harness/in-process-daemon.js";
import { StateClient } from "../harness/state-client.js";
import { sampleState } from "../harness/sample-state.js";

afterEach(async () => {
  await DaemonProcess.killAll();
});

async function loadStreamed(address: string): Promise<SystemState> {
  const client = new StateClient(address);
  try {
    const stream = client.loadStream();
    expect((await stream.ended(60_000)).code).toBe(grpc.status.OK);
    const merged = create(SystemStateSchema);
    for (const message of stream.messages) {
      Object.assign(merged.models, message.part?.models);
      Object.assign(merged.providers, message.part?.providers);
      Object.assign(merged.pools, message.part?.pools);
      if (message.part?.timestamp !== undefined) merged.timestamp = message.part.timestamp;
    }
    return merged;
  } finally {
    client.close();
  }
}

describe("Save interrupted by SIGKILL", () => {
  it("leaves the old or the new snapshot, never a mix", async () => {
    const configYaml = etcdConfigYaml(inject("etcdEndpoint"), "immediate");
    const idPrefix = "provider-family/model-name-";
    const before = sampleState({ models: 50_000, tokensUsed: 1n, idPrefix });
    const after = sampleState({ models: 50_000, tokensUsed: 2n, idPrefix });

    const first = await DaemonProcess.start({ configYaml });
    const client = new StateClient(first.address);
    await client.save({ state: before });
    // The second save is cut off part-way through its etcd transactions.
    const interrupted = client.save({ state: after }).catch(() => undefined);
    await new Promise((resolve) => setTimeout(resolve, 400));
    await first.kill();
    await interrupted;
    client.close();

    const second = await DaemonProcess.start({ configYaml });
    const loaded = await loadStreamed(second.address);
    const isOld = equals(SystemStateSchema, loaded, before);
    const isNew = equals(SystemStateSchema, loaded, after);
    console.log(`after SIGKILL during a 50,000-model save the daemon loaded the ${isNew ? "new" : isOld ? "old" : "mixed"} snapshot`);
    expect(isOld || isNew).toBe(true);
  });
});
