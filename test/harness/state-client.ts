import type { DescMessage, DescMethodUnary, MessageInitShape, MessageShape } from "@bufbuild/protobuf";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import { StateManagerService } from "../../src/gen/modelmesh/state/v1/state_manager_service_pb.js";

/** A gRPC error as the client sees it. */
export type CallError = grpc.ServiceError;

/** Calls one unary method of a protobuf-es service through a grpc-js client. */
export async function callUnary<I extends DescMessage, O extends DescMessage>(
  client: grpc.Client,
  method: DescMethodUnary<I, O>,
  request: MessageInitShape<I>,
  options: grpc.CallOptions = {},
): Promise<MessageShape<O>> {
  return await new Promise((resolve, reject) => {
    client.makeUnaryRequest<MessageShape<I>, MessageShape<O>>(
      `/${method.parent.typeName}/${method.name}`,
      (message) => Buffer.from(toBinary(method.input, message)),
      (bytes) => fromBinary(method.output, bytes),
      create(method.input, request),
      new grpc.Metadata(),
      options,
      (error, response) => (error === null && response !== undefined ? resolve(response) : reject(error)),
    );
  });
}

/** A small typed client of StateManagerService for tests. */
export class StateClient {
  readonly grpcClient: grpc.Client;

  constructor(address: string, options: grpc.ClientOptions = {}) {
    this.grpcClient = new grpc.Client(address, grpc.credentials.createInsecure(), options);
  }

  load(options?: grpc.CallOptions) {
    return callUnary(this.grpcClient, StateManagerService.method.load, {}, options);
  }

  save(request: MessageInitShape<typeof StateManagerService.method.save.input>, options?: grpc.CallOptions) {
    return callUnary(this.grpcClient, StateManagerService.method.save, request, options);
  }

  sync(options?: grpc.CallOptions) {
    return callUnary(this.grpcClient, StateManagerService.method.sync, {}, options);
  }

  getSyncStatus(options?: grpc.CallOptions) {
    return callUnary(this.grpcClient, StateManagerService.method.getSyncStatus, {}, options);
  }

  acquireLock(
    request: MessageInitShape<typeof StateManagerService.method.acquireLock.input>,
    options?: grpc.CallOptions,
  ) {
    return callUnary(this.grpcClient, StateManagerService.method.acquireLock, request, options);
  }

  releaseLock(request: MessageInitShape<typeof StateManagerService.method.releaseLock.input>) {
    return callUnary(this.grpcClient, StateManagerService.method.releaseLock, request);
  }

  refreshLock(request: MessageInitShape<typeof StateManagerService.method.refreshLock.input>) {
    return callUnary(this.grpcClient, StateManagerService.method.refreshLock, request);
  }

  describeLock(name = "") {
    return callUnary(this.grpcClient, StateManagerService.method.describeLock, { name });
  }

  updateState(request: MessageInitShape<typeof StateManagerService.method.updateState.input>, options?: grpc.CallOptions) {
    return callUnary(this.grpcClient, StateManagerService.method.updateState, request, options);
  }

  watchState(request: MessageInitShape<typeof StateManagerService.method.watchState.input> = {}, options?: grpc.CallOptions) {
    return openServerStream(this.grpcClient, StateManagerService.method.watchState, request, options);
  }

  loadStream(options?: grpc.CallOptions) {
    return openServerStream(this.grpcClient, StateManagerService.method.loadStream, {}, options);
  }

  watchSyncStatus(options?: grpc.CallOptions) {
    return openServerStream(this.grpcClient, StateManagerService.method.watchSyncStatus, {}, options);
  }

  close(): void {
    this.grpcClient.close();
  }
}

/** Awaits `promise`, expecting it to reject with a gRPC error, and returns that error. */
export async function expectCallError(promise: Promise<unknown>): Promise<CallError> {
  try {
    await promise;
  } catch (error) {
    return error as CallError;
  }
  throw new Error("expected the call to fail, but it succeeded");
}

/** An open server stream whose messages are collected as they arrive. */
export class CollectedStream<T> {
  readonly messages: T[] = [];
  /** Status the stream ended with, once it ended. */
  endStatus: grpc.StatusObject | undefined;
  private readonly waiters = new Set<() => void>();

  constructor(readonly call: grpc.ClientReadableStream<T>) {
    call.on("data", (message: T) => {
      this.messages.push(message);
      this.wakeWaiters();
    });
    call.on("status", (status: grpc.StatusObject) => {
      this.endStatus = status;
      this.wakeWaiters();
    });
    // Errors also arrive as the status; without a listener, Node would throw them.
    call.on("error", () => undefined);
  }

  /** Waits until a collected message satisfies `predicate`, and returns it. */
  async waitFor(predicate: (message: T) => boolean, timeoutMs: number, what: string): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.messages.find(predicate);
      if (found !== undefined) return found;
      if (this.endStatus !== undefined) throw new Error(`stream ended with ${this.endStatus.details} before ${what}`);
      const remainingMs = deadline - Date.now();
      if (remainingMs <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, remainingMs);
        this.waiters.add(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** Waits until the stream ended, and returns its status. */
  async ended(timeoutMs: number): Promise<grpc.StatusObject> {
    const deadline = Date.now() + timeoutMs;
    while (this.endStatus === undefined) {
      if (Date.now() > deadline) throw new Error(`the stream did not end within ${timeoutMs} ms`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    return this.endStatus;
  }

  private wakeWaiters(): void {
    for (const wake of this.waiters) wake();
    this.waiters.clear();
  }
}

/** Opens a server-streaming call of a protobuf-es method and collects what it sends. */
export function openServerStream<I extends DescMessage, O extends DescMessage>(
  client: grpc.Client,
  method: { parent: { typeName: string }; name: string; input: I; output: O },
  request: MessageInitShape<I>,
  options: grpc.CallOptions = {},
): CollectedStream<MessageShape<O>> {
  const call = client.makeServerStreamRequest<MessageShape<I>, MessageShape<O>>(
    `/${method.parent.typeName}/${method.name}`,
    (message) => Buffer.from(toBinary(method.input, message)),
    (bytes) => fromBinary(method.output, bytes),
    create(method.input, request),
    new grpc.Metadata(),
    options,
  );
  return new CollectedStream(call);
}
