import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema, timestampFromDate, type FileDescriptorProto } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import { execFile } from "node:child_process";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { file_grpc_health_v1_health } from "../../src/gen/grpc/health/v1/health_pb.js";
import {
  ExtensionRequestSchema,
  file_grpc_reflection_v1_reflection,
  ServerReflectionRequestSchema,
  ServerReflectionResponseSchema,
  type ServerReflectionRequest,
  type ServerReflectionResponse,
} from "../../src/gen/grpc/reflection/v1/reflection_pb.js";
import { file_grpc_reflection_v1alpha_reflection } from "../../src/gen/grpc/reflection/v1alpha/reflection_pb.js";
import {
  file_modelmesh_state_v1_state_manager_service,
  StateManagerService,
} from "../../src/gen/modelmesh/state/v1/state_manager_service_pb.js";
import { file_modelmesh_state_v1_state, ModelStatus, SyncPolicy } from "../../src/gen/modelmesh/state/v1/state_pb.js";
import { addService, type AdapterOptions, type ImplementationOf } from "../../src/server/grpc-adapter.js";
import { addHealthService, HealthReporter } from "../../src/server/health-service.js";
import { addReflectionService } from "../../src/server/reflection-service.js";
import { ServiceError } from "../../src/server/service-error.js";

const bufBinary = fileURLToPath(new URL("../../node_modules/.bin/buf", import.meta.url));
const fixedTime = timestampFromDate(new Date("2025-01-02T03:04:05Z"));
const fixedStatus = {
  lastSync: fixedTime,
  pendingChanges: 3n,
  policy: SyncPolicy.PERIODIC,
  connector: "test.fixed",
};

/**
 * Adds a test-only StateManagerService with fixed responses, so that buf curl
 * has real methods to call. Every method that the tests do not call fails
 * with UNIMPLEMENTED, so the fake keeps working when the service grows.
 */
function addFixedStateManager(server: grpc.Server, options: AdapterOptions): void {
  const unimplemented = async (): Promise<never> => {
    throw new ServiceError(grpc.status.UNIMPLEMENTED, "the reflection test's fake implements only Load and GetSyncStatus");
  };
  const fixedHandlers: Partial<ImplementationOf<typeof StateManagerService>> = {
    load: async () => ({
      state: { timestamp: fixedTime, models: { "model-a": { status: ModelStatus.ACTIVE, lastRequest: fixedTime } } },
    }),
    getSyncStatus: async () => ({ status: fixedStatus }),
  };
  const unimplementedHandlers = Object.fromEntries(
    StateManagerService.methods.map((method) => [method.localName, unimplemented]),
  );
  const implementation = { ...unimplementedHandlers, ...fixedHandlers } as ImplementationOf<typeof StateManagerService>;
  addService(server, StateManagerService, implementation, options);
}

let server: grpc.Server;
let address: string;
const shutdown = new AbortController();

beforeAll(async () => {
  const options: AdapterOptions = { logger: pino({ level: "silent" }), shutdownSignal: shutdown.signal };
  server = new grpc.Server();
  addFixedStateManager(server, options);
  addHealthService(server, new HealthReporter(), options);
  addReflectionService(
    server,
    [
      file_modelmesh_state_v1_state_manager_service,
      file_modelmesh_state_v1_state,
      file_grpc_health_v1_health,
      file_grpc_reflection_v1_reflection,
      file_grpc_reflection_v1alpha_reflection,
    ],
    options,
  );
  address = `127.0.0.1:${await bindLoopback(server)}`;
});

async function bindLoopback(target: grpc.Server): Promise<number> {
  return await new Promise<number>((resolve, reject) => {
    target.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, boundPort) =>
      error === null ? resolve(boundPort) : reject(error),
    );
  });
}

afterAll(() => {
  shutdown.abort();
  server.forceShutdown();
});

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

type ReflectionVersion = "v1" | "v1alpha";

/**
 * One open reflection stream. Both versions share the wire format, so the v1
 * schemas encode and decode the v1alpha stream too.
 */
class ReflectionStream {
  readonly #client: grpc.Client;
  readonly #call: grpc.ClientDuplexStream<ServerReflectionRequest, ServerReflectionResponse>;
  readonly #received: ServerReflectionResponse[] = [];
  #waiter: (() => void) | undefined;
  #error: Error | undefined;

  constructor(version: ReflectionVersion, target = address) {
    this.#client = new grpc.Client(target, grpc.credentials.createInsecure());
    this.#call = this.#client.makeBidiStreamRequest(
      `/grpc.reflection.${version}.ServerReflection/ServerReflectionInfo`,
      (message: ServerReflectionRequest) => Buffer.from(toBinary(ServerReflectionRequestSchema, message)),
      (bytes: Buffer) => fromBinary(ServerReflectionResponseSchema, bytes),
    );
    this.#call.on("data", (response: ServerReflectionResponse) => {
      this.#received.push(response);
      this.#waiter?.();
    });
    this.#call.on("error", (error: Error) => {
      this.#error = error;
      this.#waiter?.();
    });
  }

  /** Sends one request and resolves with the next response of the stream. */
  async ask(messageRequest: ServerReflectionRequest["messageRequest"]): Promise<ServerReflectionResponse> {
    this.#call.write(create(ServerReflectionRequestSchema, { host: "test-host", messageRequest }));
    while (this.#received.length === 0) {
      if (this.#error !== undefined) throw this.#error;
      await new Promise<void>((resolve) => (this.#waiter = resolve));
    }
    return this.#received.shift() as ServerReflectionResponse;
  }

  /** Resolves with the status the server ends the stream with. */
  async status(): Promise<grpc.StatusObject> {
    return await new Promise<grpc.StatusObject>((resolve) => this.#call.once("status", resolve));
  }

  /** Half-closes the stream and resolves with the status the server ends it with. */
  async finish(timeoutMs: number): Promise<grpc.StatusObject> {
    const status = this.status();
    this.#call.end();
    return await within(status, timeoutMs, "stream status after half-close");
  }

  close(): void {
    this.#call.end();
    this.#client.close();
  }
}

/** Runs a reflection request on a fresh stream and returns its response. */
async function reflect(
  messageRequest: ServerReflectionRequest["messageRequest"],
  version: ReflectionVersion = "v1",
): Promise<ServerReflectionResponse> {
  const stream = new ReflectionStream(version);
  try {
    return await stream.ask(messageRequest);
  } finally {
    stream.close();
  }
}

/** Returns the files of a file_descriptor_response, decoded, in the order sent. */
function filesOf(response: ServerReflectionResponse): FileDescriptorProto[] {
  expect(response.messageResponse.case).toBe("fileDescriptorResponse");
  if (response.messageResponse.case !== "fileDescriptorResponse") return [];
  return response.messageResponse.value.fileDescriptorProto.map((bytes) => fromBinary(FileDescriptorProtoSchema, bytes));
}

/** Returns the names of the files in a file_descriptor_response, in the order sent. */
function fileNames(response: ServerReflectionResponse): string[] {
  return filesOf(response).map((file) => file.name);
}

/** Returns the imports of the sent files that were not sent themselves. */
function missingImports(response: ServerReflectionResponse): string[] {
  const files = filesOf(response);
  const sent = new Set(files.map((file) => file.name));
  return files.flatMap((file) => file.dependency).filter((name) => !sent.has(name));
}

function errorOf(response: ServerReflectionResponse): { errorCode: number; errorMessage: string } {
  expect(response.messageResponse.case).toBe("errorResponse");
  if (response.messageResponse.case !== "errorResponse") return { errorCode: 0, errorMessage: "" };
  return response.messageResponse.value;
}

const bufTimeoutMs = 20_000;

/** Runs `buf curl` over gRPC against the test server. Rejects on a non-zero exit or when it runs past `bufTimeoutMs`. */
async function bufCurl(args: string[]): Promise<string> {
  const fullArgs = ["curl", "--protocol", "grpc", "--http2-prior-knowledge", ...args];
  try {
    const { stdout } = await promisify(execFile)(bufBinary, fullArgs, { timeout: bufTimeoutMs });
    return stdout;
  } catch (error) {
    const { killed, stdout, stderr } = error as { killed?: boolean; stdout?: string; stderr?: string };
    const outcome = killed === true ? `was killed after ${bufTimeoutMs} ms` : "failed";
    throw new Error(`buf ${fullArgs.join(" ")} ${outcome}\nstdout: ${stdout}\nstderr: ${stderr}`, { cause: error });
  }
}

describe("reflection list_services", () => {
  it("lists every served service", async () => {
    const response = await reflect({ case: "listServices", value: "" });

    expect(response.messageResponse.case).toBe("listServicesResponse");
    const names =
      response.messageResponse.case === "listServicesResponse"
        ? response.messageResponse.value.service.map((service) => service.name)
        : [];
    expect(names.sort()).toEqual([
      "grpc.health.v1.Health",
      "grpc.reflection.v1.ServerReflection",
      "grpc.reflection.v1alpha.ServerReflection",
      "modelmesh.state.v1.StateManagerService",
    ]);
  });

  it("echoes host and request", async () => {
    const response = await reflect({ case: "listServices", value: "*" });

    expect(response.validHost).toBe("test-host");
    expect(response.originalRequest?.messageRequest).toEqual({ case: "listServices", value: "*" });
  });
});

describe("reflection stream", () => {
  it("ends with OK after client half-close", async () => {
    const stream = new ReflectionStream("v1");
    try {
      await stream.ask({ case: "listServices", value: "" });

      const status = await stream.finish(5_000);
      expect(status.code).toBe(grpc.status.OK);
    } finally {
      stream.close();
    }
  });

  it("ends with UNAVAILABLE on server shutdown", async () => {
    const ownShutdown = new AbortController();
    const ownServer = new grpc.Server();
    addReflectionService(ownServer, [], { logger: pino({ level: "silent" }), shutdownSignal: ownShutdown.signal });
    const port = await bindLoopback(ownServer);
    const stream = new ReflectionStream("v1", `127.0.0.1:${port}`);
    try {
      await stream.ask({ case: "listServices", value: "" });
      const status = stream.status();

      ownShutdown.abort();

      expect((await within(status, 5_000, "stream status after server shutdown")).code).toBe(grpc.status.UNAVAILABLE);
    } finally {
      stream.close();
      ownServer.forceShutdown();
    }
  });

  it("answers requests in order on one stream", async () => {
    const stream = new ReflectionStream("v1alpha");
    try {
      const first = await stream.ask({ case: "fileByFilename", value: "grpc/health/v1/health.proto" });
      const second = await stream.ask({ case: "fileByFilename", value: "google/protobuf/timestamp.proto" });

      expect(fileNames(first)).toEqual(["grpc/health/v1/health.proto"]);
      expect(fileNames(second)).toEqual(["google/protobuf/timestamp.proto"]);
    } finally {
      stream.close();
    }
  });
});

describe("reflection file_containing_symbol", () => {
  it("returns a service's file with transitive imports", async () => {
    const response = await reflect({ case: "fileContainingSymbol", value: "modelmesh.state.v1.StateManagerService" });

    const names = fileNames(response);
    expect(names[0]).toBe("modelmesh/state/v1/state_manager_service.proto");
    expect(names).toContain("modelmesh/state/v1/state.proto");
    expect(names).toContain("google/protobuf/timestamp.proto");
    expect(missingImports(response)).toEqual([]);
    expect(new Set(names).size).toBe(names.length);
  });

  it("sends descriptors that declare their imports", async () => {
    const response = await reflect({ case: "fileContainingSymbol", value: "modelmesh.state.v1.SyncStatus" });

    const [state, timestamp] = filesOf(response);
    expect(state?.name).toBe("modelmesh/state/v1/state.proto");
    expect(state?.dependency).toEqual(["google/protobuf/timestamp.proto"]);
    expect(state?.messageType.map((message) => message.name)).toContain("SyncStatus");
    expect(timestamp?.name).toBe("google/protobuf/timestamp.proto");
    expect(timestamp?.messageType.map((message) => message.name)).toEqual(["Timestamp"]);
  });

  it.each([
    ["method", "modelmesh.state.v1.StateManagerService.GetSyncStatus", "modelmesh/state/v1/state_manager_service.proto"],
    ["message", "modelmesh.state.v1.LoadRequest", "modelmesh/state/v1/state_manager_service.proto"],
    ["imported message", "google.protobuf.Timestamp", "google/protobuf/timestamp.proto"],
    ["field", "modelmesh.state.v1.SyncStatus.last_sync", "modelmesh/state/v1/state.proto"],
    ["top-level enum", "modelmesh.state.v1.SyncPolicy", "modelmesh/state/v1/state.proto"],
    ["enum value", "modelmesh.state.v1.SYNC_POLICY_PERIODIC", "modelmesh/state/v1/state.proto"],
    ["nested enum", "grpc.health.v1.HealthCheckResponse.ServingStatus", "grpc/health/v1/health.proto"],
    ["nested enum value", "grpc.health.v1.HealthCheckResponse.SERVING", "grpc/health/v1/health.proto"],
    ["value under enum", "grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING", "grpc/health/v1/health.proto"],
    ["oneof", "grpc.reflection.v1.ServerReflectionRequest.message_request", "grpc/reflection/v1/reflection.proto"],
    ["reflection service", "grpc.reflection.v1alpha.ServerReflection", "grpc/reflection/v1alpha/reflection.proto"],
  ])("finds %s by name", async (_kind, symbol, expectedFile) => {
    const response = await reflect({ case: "fileContainingSymbol", value: symbol });

    expect(fileNames(response)[0]).toBe(expectedFile);
  });

  it("returns NOT_FOUND and keeps the stream open", async () => {
    const stream = new ReflectionStream("v1");
    try {
      const missing = await stream.ask({ case: "fileContainingSymbol", value: "modelmesh.state.v1.NoSuchThing" });
      const error = errorOf(missing);
      expect(error.errorCode).toBe(grpc.status.NOT_FOUND);
      expect(error.errorMessage).toContain('"modelmesh.state.v1.NoSuchThing"');

      const next = await stream.ask({ case: "fileContainingSymbol", value: "grpc.health.v1.Health" });
      expect(fileNames(next)).toEqual(["grpc/health/v1/health.proto"]);
    } finally {
      stream.close();
    }
  });
});

describe("reflection file_by_filename", () => {
  it("returns a well-known file", async () => {
    const response = await reflect({ case: "fileByFilename", value: "google/protobuf/timestamp.proto" });

    expect(fileNames(response)).toEqual(["google/protobuf/timestamp.proto"]);
  });

  it("returns a file with its import", async () => {
    const response = await reflect({ case: "fileByFilename", value: "modelmesh/state/v1/state.proto" });

    expect(fileNames(response)).toEqual(["modelmesh/state/v1/state.proto", "google/protobuf/timestamp.proto"]);
  });

  it("returns NOT_FOUND for an unknown file", async () => {
    const response = await reflect({ case: "fileByFilename", value: "no/such/file.proto" });

    const error = errorOf(response);
    expect(error.errorCode).toBe(grpc.status.NOT_FOUND);
    expect(error.errorMessage).toContain('"no/such/file.proto"');
  });
});

describe("reflection extensions", () => {
  it("lists no extension numbers of a message", async () => {
    const response = await reflect({ case: "allExtensionNumbersOfType", value: "modelmesh.state.v1.SystemState" });

    expect(response.messageResponse).toEqual({
      case: "allExtensionNumbersResponse",
      value: expect.objectContaining({ baseTypeName: "modelmesh.state.v1.SystemState", extensionNumber: [] }),
    });
  });

  it("returns NOT_FOUND for numbers of an unknown type", async () => {
    const response = await reflect({ case: "allExtensionNumbersOfType", value: "modelmesh.state.v1.NoSuchMessage" });

    expect(errorOf(response).errorCode).toBe(grpc.status.NOT_FOUND);
  });

  it("returns NOT_FOUND for an unknown extension", async () => {
    const response = await reflect({
      case: "fileContainingExtension",
      value: create(ExtensionRequestSchema, { containingType: "modelmesh.state.v1.SystemState", extensionNumber: 100 }),
    });

    const error = errorOf(response);
    expect(error.errorCode).toBe(grpc.status.NOT_FOUND);
    expect(error.errorMessage).toContain("100");
  });
});

describe("reflection v1alpha", () => {
  it("returns a service's file with transitive imports", async () => {
    const response = await reflect(
      { case: "fileContainingSymbol", value: "modelmesh.state.v1.StateManagerService" },
      "v1alpha",
    );

    const names = fileNames(response);
    expect(names[0]).toBe("modelmesh/state/v1/state_manager_service.proto");
    expect(names).toContain("google/protobuf/timestamp.proto");
    expect(missingImports(response)).toEqual([]);
  });

  it("returns NOT_FOUND for an unknown symbol", async () => {
    const response = await reflect({ case: "fileContainingSymbol", value: "no.such.Symbol" }, "v1alpha");

    expect(errorOf(response).errorCode).toBe(grpc.status.NOT_FOUND);
  });
});

describe("reflection through buf curl", () => {
  it("lists the StateManagerService methods", async () => {
    const stdout = await bufCurl(["--list-methods", `http://${address}`]);

    const methods = stdout.split("\n").filter((line) => line !== "");
    expect(methods).toEqual(
      expect.arrayContaining([
        "modelmesh.state.v1.StateManagerService/Load",
        "modelmesh.state.v1.StateManagerService/Save",
        "modelmesh.state.v1.StateManagerService/Sync",
        "modelmesh.state.v1.StateManagerService/GetSyncStatus",
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Watch",
      ]),
    );
  });

  describe.each(["grpc-v1", "grpc-v1alpha"])("with %s", (protocol) => {
    it("calls GetSyncStatus", async () => {
      const stdout = await bufCurl([
        "--reflect-protocol",
        protocol,
        `http://${address}/modelmesh.state.v1.StateManagerService/GetSyncStatus`,
      ]);

      expect(JSON.parse(stdout)).toEqual({
        status: {
          lastSync: "2025-01-02T03:04:05Z",
          pendingChanges: "3",
          policy: "SYNC_POLICY_PERIODIC",
          connector: "test.fixed",
        },
      });
    });

    it("calls Load", async () => {
      const stdout = await bufCurl([
        "--reflect-protocol",
        protocol,
        `http://${address}/modelmesh.state.v1.StateManagerService/Load`,
      ]);

      expect(JSON.parse(stdout)).toEqual({
        state: {
          timestamp: "2025-01-02T03:04:05Z",
          models: { "model-a": { status: "MODEL_STATUS_ACTIVE", lastRequest: "2025-01-02T03:04:05Z" } },
        },
      });
    });
  });
});
