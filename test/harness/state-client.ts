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
