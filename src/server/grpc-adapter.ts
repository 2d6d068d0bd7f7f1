import type { DescMessage, DescMethod, MessageInitShape, MessageShape } from "@bufbuild/protobuf";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import type { GenService, GenServiceMethods } from "@bufbuild/protobuf/codegenv2";
import * as grpc from "@grpc/grpc-js";
import type { EventEmitter } from "node:events";
import type { Logger } from "pino";
import type { CallContext } from "./call-context.js";
import { cancelled, invalidArgument, unavailable } from "./service-error.js";
import { toGrpcStatus } from "./to-grpc-status.js";

/** Sends one message of a server stream; resolves once the stream can take more. */
export type SendMessage<O extends DescMessage> = (message: MessageInitShape<O>) => Promise<void>;

type UnaryHandler<I extends DescMessage, O extends DescMessage> = (
  request: MessageShape<I>,
  context: CallContext,
) => Promise<MessageInitShape<O>>;

type ServerStreamingHandler<I extends DescMessage, O extends DescMessage> = (
  request: MessageShape<I>,
  context: CallContext,
  send: SendMessage<O>,
) => Promise<void>;

type BidiStreamingHandler<I extends DescMessage, O extends DescMessage> = (
  requests: AsyncIterable<MessageShape<I>>,
  context: CallContext,
  send: SendMessage<O>,
) => Promise<void>;

/** Handlers for every method of a generated service, keyed by the method's local name. */
export type ServiceImplementation<T extends GenServiceMethods> = {
  [K in keyof T]: T[K]["methodKind"] extends "unary"
    ? UnaryHandler<T[K]["input"], T[K]["output"]>
    : T[K]["methodKind"] extends "server_streaming"
      ? ServerStreamingHandler<T[K]["input"], T[K]["output"]>
      : T[K]["methodKind"] extends "bidi_streaming"
        ? BidiStreamingHandler<T[K]["input"], T[K]["output"]>
        : never;
};

/** Handlers for every method of the generated service `S`, such as `typeof StateManagerService`. */
export type ImplementationOf<S> = S extends GenService<infer T> ? ServiceImplementation<T> : never;

export interface AdapterOptions {
  logger: Logger;
  /** Aborted when the server shuts down, which ends every open stream. */
  shutdownSignal: AbortSignal;
}

let nextCallId = 1;

/**
 * Adds a protobuf-es service to a grpc-js server. Requests reach grpc-js as
 * raw bytes and are decoded here, so a malformed message gets INVALID_ARGUMENT
 * naming its type instead of grpc-js's generic deserialization error.
 */
export function addService<T extends GenServiceMethods>(
  server: grpc.Server,
  service: GenService<T>,
  implementation: ServiceImplementation<T>,
  options: AdapterOptions,
): void {
  const definition: Record<string, grpc.MethodDefinition<Buffer, Uint8Array>> = {};
  const handlers: grpc.UntypedServiceImplementation = {};
  for (const method of service.methods) {
    const handler = (implementation as Record<string, unknown>)[method.localName];
    if (typeof handler !== "function") {
      throw new Error(`cannot add ${service.typeName}: no handler for method ${method.name}`);
    }
    definition[method.name] = methodDefinition(service.typeName, method);
    handlers[method.name] = wrapHandler(method, handler as AnyHandler, options);
  }
  server.addService(definition, handlers);
}

type AnyHandler = (...args: unknown[]) => Promise<unknown>;

function methodDefinition(serviceName: string, method: DescMethod): grpc.MethodDefinition<Buffer, Uint8Array> {
  return {
    path: `/${serviceName}/${method.name}`,
    requestStream: method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming",
    responseStream: method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming",
    requestSerialize: (bytes: Buffer) => bytes,
    requestDeserialize: (bytes: Buffer) => bytes,
    responseSerialize: (bytes: Uint8Array) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength),
    responseDeserialize: (bytes: Buffer) => bytes,
  };
}

function decodeRequest<I extends DescMessage>(schema: I, bytes: Buffer): MessageShape<I> {
  try {
    return fromBinary(schema, bytes);
  } catch (error) {
    throw invalidArgument(`cannot decode ${schema.typeName}: ${(error as Error).message}`);
  }
}

function encodeResponse<O extends DescMessage>(schema: O, message: MessageInitShape<O>): Uint8Array {
  return toBinary(schema, create(schema, message));
}

function wrapHandler(method: DescMethod, handler: AnyHandler, options: AdapterOptions): grpc.UntypedHandleCall {
  switch (method.methodKind) {
    case "unary":
      return (call: grpc.ServerUnaryCall<Buffer, Uint8Array>, callback: grpc.sendUnaryData<Uint8Array>) => {
        const context = openContext(method, call, options);
        void runUnary(method, handler, call.request, context, callback);
      };
    case "server_streaming":
      return (call: grpc.ServerWritableStream<Buffer, Uint8Array>) => {
        const context = openContext(method, call, options);
        const send = streamSender(method, call, context);
        const run = async (): Promise<void> => {
          await handler(decodeRequest(method.input, call.request), context.call, send);
        };
        void finishStream(run, call, context);
      };
    case "bidi_streaming":
      return (call: grpc.ServerDuplexStream<Buffer, Uint8Array>) => {
        const context = openContext(method, call, options);
        const send = streamSender(method, call, context);
        const requests = decodeStream(method.input, call);
        void finishStream(() => handler(requests, context.call, send), call, context);
      };
    case "client_streaming":
      throw new Error(`cannot serve ${method.parent.typeName}/${method.name}: client streaming is not supported`);
  }
}

interface OpenContext {
  call: CallContext;
  startedAt: number;
  /** Detaches the context from the call and the server once the call has ended. */
  close(): void;
}

/** The part of every grpc-js server call that a context needs. */
type AnyServerCall = EventEmitter & { getDeadline(): grpc.Deadline; getPeer(): string };

function openContext(method: DescMethod, call: AnyServerCall, options: AdapterOptions): OpenContext {
  const controller = new AbortController();
  const callId = nextCallId++;
  const logger = options.logger.child({ method: `${method.parent.typeName}/${method.name}`, callId });
  // The reasons are service errors, so a handler that rethrows them sends a fitting status.
  const onCancelled = (): void => controller.abort(cancelled("the call was cancelled or its deadline passed"));
  const onShutdown = (): void =>
    controller.abort(unavailable("the state daemon is shutting down; retry on another instance or after restart"));
  call.once("cancelled", onCancelled);
  options.shutdownSignal.addEventListener("abort", onShutdown, { once: true });
  if (options.shutdownSignal.aborted) onShutdown();
  const deadline = call.getDeadline();
  const deadlineDate = deadline instanceof Date ? deadline : Number.isFinite(deadline) ? new Date(deadline) : undefined;
  logger.debug({ peer: call.getPeer() }, "call started");
  return {
    call: { signal: controller.signal, deadline: deadlineDate, peer: call.getPeer(), logger },
    startedAt: performance.now(),
    close: () => {
      call.removeListener("cancelled", onCancelled);
      options.shutdownSignal.removeEventListener("abort", onShutdown);
      // Ends waits of the handler that are still pending, such as a stream's wait for drain.
      if (!controller.signal.aborted) controller.abort(cancelled("the call has ended"));
    },
  };
}

async function runUnary(
  method: DescMethod,
  handler: AnyHandler,
  bytes: Buffer,
  context: OpenContext,
  callback: grpc.sendUnaryData<Uint8Array>,
): Promise<void> {
  try {
    const response = await handler(decodeRequest(method.input, bytes), context.call);
    const encoded = encodeResponse(method.output, response as MessageInitShape<DescMessage>);
    logCallEnd(context, grpc.status.OK);
    callback(null, encoded);
  } catch (error) {
    const status = toGrpcStatus(error, context.call.logger);
    logCallEnd(context, status.code, status.details);
    callback(status);
  } finally {
    context.close();
  }
}

async function finishStream(
  run: () => Promise<unknown>,
  call: grpc.ServerWritableStream<Buffer, Uint8Array> | grpc.ServerDuplexStream<Buffer, Uint8Array>,
  context: OpenContext,
): Promise<void> {
  try {
    await run();
    logCallEnd(context, grpc.status.OK);
    if (!call.cancelled) call.end();
  } catch (error) {
    const status = toGrpcStatus(error, context.call.logger);
    logCallEnd(context, status.code, status.details);
    // A cancelled call has no client left to read the status. grpc-js turns an "error" event of a server
    // stream into the call's status; destroying the stream instead would end it without any status.
    if (!call.cancelled) call.emit("error", Object.assign(new Error(status.details), status));
  } finally {
    context.close();
  }
}

function streamSender<O extends DescMessage>(
  method: DescMethod,
  call: grpc.ServerWritableStream<Buffer, Uint8Array> | grpc.ServerDuplexStream<Buffer, Uint8Array>,
  context: OpenContext,
): SendMessage<O> {
  return async (message) => {
    const { signal } = context.call;
    signal.throwIfAborted();
    const encoded = encodeResponse(method.output as O, message);
    if (call.write(encoded)) return;
    // The transport buffer is full: wait until the client reads, or the call ends.
    await new Promise<void>((resolve, reject) => {
      const onDrain = (): void => {
        signal.removeEventListener("abort", onAbort);
        resolve();
      };
      const onAbort = (): void => {
        call.removeListener("drain", onDrain);
        reject(signal.reason);
      };
      call.once("drain", onDrain);
      signal.addEventListener("abort", onAbort, { once: true });
    });
  };
}

async function* decodeStream<I extends DescMessage>(
  schema: I,
  call: grpc.ServerDuplexStream<Buffer, Uint8Array>,
): AsyncGenerator<MessageShape<I>> {
  // Without destroyOnReturn: false, the end of the client's half of the stream would destroy the whole call
  // before the handler sends its last messages and the status.
  for await (const bytes of call.iterator({ destroyOnReturn: false }) as AsyncIterable<Buffer>) {
    yield decodeRequest(schema, bytes);
  }
}

function logCallEnd(context: OpenContext, code: grpc.status, details?: string): void {
  const durationMs = Math.round((performance.now() - context.startedAt) * 10) / 10;
  const fields = { code: grpc.status[code], durationMs };
  if (code === grpc.status.OK) {
    context.call.logger.debug(fields, "call finished");
  } else if (code === grpc.status.CANCELLED) {
    context.call.logger.debug({ ...fields, details }, "call cancelled");
  } else {
    context.call.logger.warn({ ...fields, details }, "call failed");
  }
}
