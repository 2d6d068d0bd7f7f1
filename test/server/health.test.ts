import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { pino } from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import {
  HealthCheckRequestSchema,
  HealthCheckResponse_ServingStatus as ServingStatus,
  HealthCheckResponseSchema,
  type HealthCheckRequest,
  type HealthCheckResponse,
} from "../../src/gen/grpc/health/v1/health_pb.js";
import { addHealthService, HealthReporter } from "../../src/server/health-service.js";

const stateManagerName = "modelmesh.state.v1.StateManagerService";

interface TestServer {
  reporter: HealthReporter;
  client: grpc.Client;
  /** Aborts the adapter's shutdown signal, as the daemon does when it stops. */
  shutdown: AbortController;
  stop(): void;
}

const running: TestServer[] = [];

afterEach(() => {
  for (const server of running.splice(0)) server.stop();
});

async function startHealthServer(reporter = new HealthReporter()): Promise<TestServer> {
  const shutdown = new AbortController();
  const server = new grpc.Server();
  addHealthService(server, reporter, { logger: pino({ level: "silent" }), shutdownSignal: shutdown.signal });
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, boundPort) =>
      error === null ? resolve(boundPort) : reject(error),
    );
  });
  const client = new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  const testServer: TestServer = {
    reporter,
    client,
    shutdown,
    stop: () => {
      client.close();
      shutdown.abort();
      server.forceShutdown();
    },
  };
  running.push(testServer);
  return testServer;
}

/** Resolves like `promise`, or rejects after `timeoutMs` so that a missing event fails fast with a clear message. */
async function within<T>(promise: Promise<T>, timeoutMs: number, description: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`${description} did not happen within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

const serialize = (message: HealthCheckRequest): Buffer => Buffer.from(toBinary(HealthCheckRequestSchema, message));
const deserialize = (bytes: Buffer): HealthCheckResponse => fromBinary(HealthCheckResponseSchema, bytes);

async function check(client: grpc.Client, service: string): Promise<ServingStatus> {
  const response = await new Promise<HealthCheckResponse>((resolve, reject) => {
    client.makeUnaryRequest(
      "/grpc.health.v1.Health/Check",
      serialize,
      deserialize,
      create(HealthCheckRequestSchema, { service }),
      (error, value) => (error === null && value !== undefined ? resolve(value) : reject(error)),
    );
  });
  return response.status;
}

/** An open Watch call with the statuses it received so far. */
class WatchCall {
  readonly call: grpc.ClientReadableStream<HealthCheckResponse>;
  readonly statuses: ServingStatus[] = [];
  readonly ended: Promise<grpc.StatusObject>;

  constructor(client: grpc.Client, service: string) {
    this.call = client.makeServerStreamRequest(
      "/grpc.health.v1.Health/Watch",
      serialize,
      deserialize,
      create(HealthCheckRequestSchema, { service }),
    );
    this.call.on("data", (response: HealthCheckResponse) => this.statuses.push(response.status));
    // The error event repeats the status, and an error event without a listener is thrown as unhandled.
    this.call.on("error", () => undefined);
    this.ended = new Promise((resolve) => this.call.once("status", resolve));
  }

  /** Waits until `count` statuses have arrived and returns them all. */
  async waitForStatuses(count: number): Promise<ServingStatus[]> {
    await vi.waitFor(() => expect(this.statuses.length).toBeGreaterThanOrEqual(count), { timeout: 5_000 });
    return this.statuses;
  }
}

describe("HealthReporter", () => {
  it("reports the whole server SERVING by default", () => {
    const reporter = new HealthReporter();

    expect(reporter.getStatus("")).toBe(ServingStatus.SERVING);
    expect(reporter.getStatus(stateManagerName)).toBeUndefined();
  });

  it("notifies only on change", () => {
    const reporter = new HealthReporter();
    const seen: ServingStatus[] = [];
    const unsubscribe = reporter.subscribe("", (status) => seen.push(status));

    reporter.setStatus("", ServingStatus.SERVING);
    reporter.setStatus("", ServingStatus.NOT_SERVING);
    reporter.setStatus("", ServingStatus.NOT_SERVING);
    unsubscribe();
    reporter.setStatus("", ServingStatus.SERVING);

    expect(seen).toEqual([ServingStatus.NOT_SERVING]);
    expect(reporter.subscriberCount).toBe(0);
  });

  it("rejects SERVICE_UNKNOWN", () => {
    const reporter = new HealthReporter();

    expect(() => reporter.setStatus("", ServingStatus.SERVICE_UNKNOWN)).toThrow(/SERVICE_UNKNOWN/);
  });

  it("sets every service NOT_SERVING", () => {
    const reporter = new HealthReporter([
      ["", ServingStatus.SERVING],
      [stateManagerName, ServingStatus.SERVING],
    ]);

    reporter.setAllNotServing();

    expect(reporter.getStatus("")).toBe(ServingStatus.NOT_SERVING);
    expect(reporter.getStatus(stateManagerName)).toBe(ServingStatus.NOT_SERVING);
  });
});

describe("Health/Check", () => {
  it("returns SERVING and NOT_SERVING per service", async () => {
    const { client, reporter } = await startHealthServer();
    reporter.setStatus(stateManagerName, ServingStatus.NOT_SERVING);

    expect(await check(client, "")).toBe(ServingStatus.SERVING);
    expect(await check(client, stateManagerName)).toBe(ServingStatus.NOT_SERVING);
  });

  it("follows status changes", async () => {
    const { client, reporter } = await startHealthServer();

    reporter.setStatus("", ServingStatus.NOT_SERVING);
    expect(await check(client, "")).toBe(ServingStatus.NOT_SERVING);
    reporter.setStatus("", ServingStatus.SERVING);
    expect(await check(client, "")).toBe(ServingStatus.SERVING);
  });

  it("returns NOT_FOUND for an unknown service", async () => {
    const { client } = await startHealthServer();

    const error = await check(client, "no.such.Service").catch((caught: grpc.ServiceError) => caught);

    expect(error).toMatchObject({ code: grpc.status.NOT_FOUND });
    expect((error as grpc.ServiceError).details).toContain('"no.such.Service"');
  });
});

describe("Health/Watch", () => {
  it("sends the current status, then a flip", async () => {
    const { client, reporter } = await startHealthServer();
    const watch = new WatchCall(client, "");

    expect(await watch.waitForStatuses(1)).toEqual([ServingStatus.SERVING]);
    reporter.setStatus("", ServingStatus.NOT_SERVING);
    expect(await watch.waitForStatuses(2)).toEqual([ServingStatus.SERVING, ServingStatus.NOT_SERVING]);
    watch.call.cancel();
  });

  it("sends SERVICE_UNKNOWN, then the first status", async () => {
    const { client, reporter } = await startHealthServer();
    const watch = new WatchCall(client, stateManagerName);

    expect(await watch.waitForStatuses(1)).toEqual([ServingStatus.SERVICE_UNKNOWN]);
    reporter.setStatus(stateManagerName, ServingStatus.SERVING);
    expect(await watch.waitForStatuses(2)).toEqual([ServingStatus.SERVICE_UNKNOWN, ServingStatus.SERVING]);
    watch.call.cancel();
  });

  it("sends only the latest of quick changes", async () => {
    const { client, reporter } = await startHealthServer();
    const watch = new WatchCall(client, "");
    await watch.waitForStatuses(1);

    // Synchronous changes all land before the handler runs again. A queue would send NOT_SERVING next.
    for (let i = 0; i < 1000; i++) {
      reporter.setStatus("", i % 2 === 0 ? ServingStatus.NOT_SERVING : ServingStatus.SERVING);
    }
    reporter.setStatus("", ServingStatus.UNKNOWN);

    expect(await watch.waitForStatuses(2)).toEqual([ServingStatus.SERVING, ServingStatus.UNKNOWN]);
    reporter.setStatus("", ServingStatus.SERVING);
    expect(await watch.waitForStatuses(3)).toEqual([
      ServingStatus.SERVING,
      ServingStatus.UNKNOWN,
      ServingStatus.SERVING,
    ]);
    watch.call.cancel();
  });

  it("removes the subscriber on cancel", async () => {
    const { client, reporter } = await startHealthServer();
    const watch = new WatchCall(client, "");
    await watch.waitForStatuses(1);
    expect(reporter.subscriberCount).toBe(1);

    watch.call.cancel();

    await vi.waitFor(() => expect(reporter.subscriberCount).toBe(0), { timeout: 5_000 });
    expect((await within(watch.ended, 5_000, "Watch status after cancel")).code).toBe(grpc.status.CANCELLED);
  });

  it("removes the subscriber on deadline", async () => {
    const { client, reporter } = await startHealthServer();
    const call = client.makeServerStreamRequest(
      "/grpc.health.v1.Health/Watch",
      serialize,
      deserialize,
      create(HealthCheckRequestSchema, { service: "" }),
      { deadline: Date.now() + 300 },
    );
    call.on("data", () => undefined);
    call.on("error", () => undefined);
    const ended = new Promise<grpc.StatusObject>((resolve) => call.once("status", resolve));

    expect((await within(ended, 5_000, "Watch status after deadline")).code).toBe(grpc.status.DEADLINE_EXCEEDED);
    await vi.waitFor(() => expect(reporter.subscriberCount).toBe(0), { timeout: 5_000 });
  });

  it("ends with UNAVAILABLE on server shutdown", async () => {
    const { client, reporter, shutdown } = await startHealthServer();
    const watch = new WatchCall(client, "");
    await watch.waitForStatuses(1);

    shutdown.abort();

    const status = await within(watch.ended, 5_000, "Watch status after server shutdown");
    expect(status.code).toBe(grpc.status.UNAVAILABLE);
    expect(reporter.subscriberCount).toBe(0);
  });
});
