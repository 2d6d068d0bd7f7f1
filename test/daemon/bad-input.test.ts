import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, equals, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SaveRequestSchema } from "../../src/gen/modelmesh/state/v1/state_manager_service_pb.js";
import { SystemStateSchema, type DeactivationReason, type ModelStatus } from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { LocalFileConnector } from "../../src/storage/local-file-connector.js";
import { startInProcessDaemon, type InProcessDaemon } from "../harness/in-process-daemon.js";
import { expectCallError } from "../harness/state-client.js";
import { sampleState } from "../harness/sample-state.js";

type StateInit = MessageInitShape<typeof SystemStateSchema>;

const badStates: Array<{ name: string; state: StateInit; code: grpc.status; message: string }> = [
  {
    name: "empty model id",
    state: { models: { "": {} } },
    code: grpc.status.INVALID_ARGUMENT,
    message: 'state.models[""]: the id is empty',
  },
  {
    name: "oversized provider id",
    state: { providers: { ["p".repeat(513)]: {} } },
    code: grpc.status.INVALID_ARGUMENT,
    message: "the id is 513 bytes long, over the limit of 512",
  },
  {
    name: "control character in pool id",
    state: { pools: { "chat\n": {} } },
    code: grpc.status.INVALID_ARGUMENT,
    message: "the id contains a control character",
  },
  {
    name: "empty id in a pool list",
    state: { pools: { chat: { activeModels: ["a", ""] } } },
    code: grpc.status.INVALID_ARGUMENT,
    message: 'state.pools["chat"].active_models[1]: the id is empty',
  },
  {
    name: "negative counter",
    state: { models: { m: { failureCount: -1n } } },
    code: grpc.status.INVALID_ARGUMENT,
    message: 'state.models["m"].failure_count: counters cannot be negative, got -1',
  },
  {
    name: "negative provider counter",
    state: { providers: { p: { totalQuotaUsed: -5n } } },
    code: grpc.status.INVALID_ARGUMENT,
    message: 'state.providers["p"].total_quota_used',
  },
  {
    name: "NaN error rate",
    state: { models: { m: { errorRate: Number.NaN } } },
    code: grpc.status.INVALID_ARGUMENT,
    message: 'state.models["m"].error_rate: expected a finite number from 0 to 1, got NaN',
  },
  {
    name: "infinite cost",
    state: { models: { m: { costAccumulated: Number.POSITIVE_INFINITY } } },
    code: grpc.status.INVALID_ARGUMENT,
    message: 'state.models["m"].cost_accumulated',
  },
  {
    name: "availability score above 1",
    state: { providers: { p: { availabilityScore: 1.5 } } },
    code: grpc.status.INVALID_ARGUMENT,
    message: 'state.providers["p"].availability_score',
  },
  {
    name: "unknown status enum value",
    state: { models: { m: { status: 99 as ModelStatus } } },
    code: grpc.status.INVALID_ARGUMENT,
    message: 'state.models["m"].status: unknown enum value 99',
  },
  {
    name: "unknown deactivation reason",
    state: { models: { m: { deactivationReason: 42 as DeactivationReason } } },
    code: grpc.status.INVALID_ARGUMENT,
    message: 'state.models["m"].deactivation_reason: unknown enum value 42',
  },
  {
    name: "timestamp nanos out of range",
    state: { timestamp: { seconds: 1n, nanos: 1_000_000_000 } },
    code: grpc.status.INVALID_ARGUMENT,
    message: "state.timestamp: nanos 1000000000",
  },
];

describe("Save with bad input", () => {
  let running: InProcessDaemon;
  let folder: string;
  let path: string;
  const goodState = sampleState();

  beforeAll(async () => {
    folder = await mkdtemp(join(tmpdir(), "modelmesh-bad-input-"));
    path = join(folder, "state.bin");
    running = await startInProcessDaemon(
      [
        "storage:",
        "  connector: modelmesh.local-file.v1",
        "  persistence: { sync_policy: immediate }",
        `  local_file: { path: ${JSON.stringify(path)} }`,
        "server:",
        "  max_receive_message_bytes: 1048576",
        "  max_state_entities: 1000",
      ].join("\n"),
    );
    await running.client.save({ state: goodState });
  });

  afterAll(async () => {
    await running.stop();
    await rm(folder, { recursive: true, force: true });
  });

  async function expectUnchanged(): Promise<void> {
    const loaded = await running.client.load();
    expect(equals(SystemStateSchema, loaded.state!, goodState)).toBe(true);
    const stored = await new LocalFileConnector(path, pino({ level: "silent" })).load();
    expect(equals(SystemStateSchema, stored!, goodState)).toBe(true);
  }

  it.each(badStates)("rejects $name", async ({ state, code, message }) => {
    const error = await expectCallError(running.client.save({ state: create(SystemStateSchema, state) }));
    expect(grpc.status[error.code]).toBe(grpc.status[code]);
    expect(error.details).toContain(message);
    await expectUnchanged();
  });

  it("rejects a request without a state", async () => {
    const error = await expectCallError(running.client.save({}));
    expect(error.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(error.details).toContain("state is required");
    await expectUnchanged();
  });

  it("rejects more entities than the limit", async () => {
    const error = await expectCallError(running.client.save({ state: sampleState({ models: 1000 }) }));
    expect(error.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(error.details).toContain("over the limit of 1000 (server.max_state_entities)");
    await expectUnchanged();
  });

  it("rejects a request over the message size limit", async () => {
    const bigPool = { activeModels: Array.from({ length: 40_000 }, (_, index) => `model-with-a-long-name-${index}`) };
    const error = await expectCallError(running.client.save({ state: { pools: { big: bigPool } } }));
    expect(error.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
    expect(error.details).toMatch(/larger than max/i);
    await expectUnchanged();
  });

  it("rejects a malformed message with INVALID_ARGUMENT", async () => {
    const client = running.client.grpcClient;
    const garbage = Buffer.from([0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    const error = await expectCallError(
      new Promise((resolve, reject) => {
        client.makeUnaryRequest(
          "/modelmesh.state.v1.StateManagerService/Save",
          (bytes: Buffer) => bytes,
          (bytes: Buffer) => bytes,
          garbage,
          (callError, response) => (callError === null ? resolve(response) : reject(callError)),
        );
      }),
    );
    expect(error.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(error.details).toContain("cannot decode modelmesh.state.v1.SaveRequest");
    await expectUnchanged();
  });

  it("keeps serving after a cancelled call", async () => {
    const client = running.client.grpcClient;
    const request = Buffer.from(toBinary(SaveRequestSchema, create(SaveRequestSchema, { state: goodState })));
    const outcome = await new Promise<grpc.status>((resolve) => {
      const call = client.makeUnaryRequest(
        "/modelmesh.state.v1.StateManagerService/Save",
        (bytes: Buffer) => bytes,
        (bytes: Buffer) => bytes,
        request,
        (callError) => resolve(callError === null ? grpc.status.OK : callError.code),
      );
      setImmediate(() => call.cancel());
    });
    // The cancel may reach the daemon before or after it served the call; both are fine.
    expect([grpc.status.CANCELLED, grpc.status.OK]).toContain(outcome);
    await expectUnchanged();
  });
});
