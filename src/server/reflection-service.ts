import type { DescEnum, DescExtension, DescFile, DescMessage } from "@bufbuild/protobuf";
import { toBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import * as grpc from "@grpc/grpc-js";
import {
  ServerReflection as ServerReflectionV1,
  file_grpc_reflection_v1_reflection,
} from "../gen/grpc/reflection/v1/reflection_pb.js";
import {
  ServerReflection as ServerReflectionV1alpha,
  file_grpc_reflection_v1alpha_reflection,
} from "../gen/grpc/reflection/v1alpha/reflection_pb.js";
import type { CallContext } from "./call-context.js";
import { addService, type AdapterOptions } from "./grpc-adapter.js";

/**
 * Adds gRPC server reflection, both `grpc.reflection.v1.ServerReflection` and
 * the older `grpc.reflection.v1alpha.ServerReflection` that some clients
 * still ask first. `files` are the files whose services the server serves.
 * Their imports, the google/protobuf well-known files included, are served
 * too, because a client needs every imported file to build a method's
 * schema. The two reflection files are always added.
 */
export function addReflectionService(server: grpc.Server, files: DescFile[], options: AdapterOptions): void {
  const index = buildReflectionIndex([
    ...files,
    file_grpc_reflection_v1_reflection,
    file_grpc_reflection_v1alpha_reflection,
  ]);
  addService(
    server,
    ServerReflectionV1,
    { serverReflectionInfo: (requests, context, send) => serveReflectionStream(index, requests, context, send) },
    options,
  );
  addService(
    server,
    ServerReflectionV1alpha,
    { serverReflectionInfo: (requests, context, send) => serveReflectionStream(index, requests, context, send) },
    options,
  );
}

/** Lookup tables built once from the transitive closure of the served files. */
interface ReflectionIndex {
  /** Fully qualified names of the services declared in the files given, not in their imports. */
  serviceNames: string[];
  /** Files by their path, such as "google/protobuf/timestamp.proto". */
  filesByPath: Map<string, DescFile>;
  /** The file that declares each fully qualified symbol. */
  filesBySymbol: Map<string, DescFile>;
  /** Fully qualified names of all messages, nested ones included. */
  messageNames: Set<string>;
  /** Extensions by the fully qualified name of the message they extend. */
  extensionsByExtendee: Map<string, DescExtension[]>;
  /** Each file's FileDescriptorProto in wire format, encoded once. */
  encodedFiles: Map<DescFile, Uint8Array>;
}

function buildReflectionIndex(files: DescFile[]): ReflectionIndex {
  const index: ReflectionIndex = {
    serviceNames: [],
    filesByPath: new Map(),
    filesBySymbol: new Map(),
    messageNames: new Set(),
    extensionsByExtendee: new Map(),
    encodedFiles: new Map(),
  };
  for (const file of files) {
    addFileWithImports(index, file);
  }
  const givenFiles = new Set(files);
  for (const file of givenFiles) {
    for (const service of file.services) index.serviceNames.push(service.typeName);
  }
  return index;
}

function addFileWithImports(index: ReflectionIndex, file: DescFile): void {
  const path = file.proto.name;
  const known = index.filesByPath.get(path);
  if (known === file) return;
  if (known !== undefined) {
    // Two descriptors under one path mean two copies of generated code, and a client could get either.
    throw new Error(`cannot add reflection: two different descriptors are named "${path}"`);
  }
  index.filesByPath.set(path, file);
  index.encodedFiles.set(file, toBinary(FileDescriptorProtoSchema, file.proto));
  indexSymbols(index, file);
  for (const dependency of file.dependencies) {
    addFileWithImports(index, dependency);
  }
}

/**
 * Indexes the fully qualified name of each service, method, message, field,
 * oneof, enum, enum value and extension in `file`.
 */
function indexSymbols(index: ReflectionIndex, file: DescFile): void {
  for (const service of file.services) {
    addSymbol(index, service.typeName, file);
    for (const method of service.methods) addSymbol(index, `${service.typeName}.${method.name}`, file);
  }
  for (const message of file.messages) indexMessage(index, message, file);
  for (const enumeration of file.enums) indexEnum(index, enumeration, file);
  for (const extension of file.extensions) indexExtension(index, extension, file);
}

function indexMessage(index: ReflectionIndex, message: DescMessage, file: DescFile): void {
  addSymbol(index, message.typeName, file);
  index.messageNames.add(message.typeName);
  for (const field of message.fields) addSymbol(index, `${message.typeName}.${field.name}`, file);
  for (const oneof of message.oneofs) addSymbol(index, `${message.typeName}.${oneof.name}`, file);
  for (const nested of message.nestedMessages) indexMessage(index, nested, file);
  for (const nested of message.nestedEnums) indexEnum(index, nested, file);
  for (const nested of message.nestedExtensions) indexExtension(index, nested, file);
}

function indexEnum(index: ReflectionIndex, enumeration: DescEnum, file: DescFile): void {
  addSymbol(index, enumeration.typeName, file);
  // Protobuf scopes an enum value as a sibling of its enum (pkg.VALUE). The
  // name under the enum (pkg.Enum.VALUE) is indexed too, and no other symbol can have it.
  const scope = enumeration.typeName.slice(0, Math.max(enumeration.typeName.lastIndexOf("."), 0));
  for (const value of enumeration.values) {
    addSymbol(index, scope === "" ? value.name : `${scope}.${value.name}`, file);
    addSymbol(index, `${enumeration.typeName}.${value.name}`, file);
  }
}

function indexExtension(index: ReflectionIndex, extension: DescExtension, file: DescFile): void {
  addSymbol(index, extension.typeName, file);
  const extendee = extension.extendee.typeName;
  const extensions = index.extensionsByExtendee.get(extendee) ?? [];
  extensions.push(extension);
  index.extensionsByExtendee.set(extendee, extensions);
}

function addSymbol(index: ReflectionIndex, name: string, file: DescFile): void {
  if (!index.filesBySymbol.has(name)) index.filesBySymbol.set(name, file);
}

/** The oneof `message_request`, whose shape v1 and v1alpha share. */
interface ReflectionRequest {
  host: string;
  messageRequest:
    | { case: "fileByFilename"; value: string }
    | { case: "fileContainingSymbol"; value: string }
    | { case: "fileContainingExtension"; value: { containingType: string; extensionNumber: number } }
    | { case: "allExtensionNumbersOfType"; value: string }
    | { case: "listServices"; value: string }
    | { case: undefined; value?: undefined };
}

/** The oneof `message_response`, whose shape v1 and v1alpha share. */
type MessageResponse =
  | { case: "fileDescriptorResponse"; value: { fileDescriptorProto: Uint8Array[] } }
  | { case: "allExtensionNumbersResponse"; value: { baseTypeName: string; extensionNumber: number[] } }
  | { case: "listServicesResponse"; value: { service: { name: string }[] } }
  | { case: "errorResponse"; value: { errorCode: number; errorMessage: string } };

/**
 * Responds to each request of one reflection stream in order until the
 * client closes its side. An unknown name gets an error_response and leaves
 * the stream open, as the reflection protocol expects.
 */
async function serveReflectionStream<R extends ReflectionRequest>(
  index: ReflectionIndex,
  requests: AsyncIterable<R>,
  context: CallContext,
  send: (response: { validHost: string; originalRequest: R; messageResponse: MessageResponse }) => Promise<void>,
): Promise<void> {
  for await (const request of untilAborted(requests, context.signal)) {
    const messageResponse = buildResponse(index, request);
    if (messageResponse.case === "errorResponse") {
      // Clients probe names that may not exist, so a failed lookup is routine and logged at debug level.
      context.logger.debug(
        { request: request.messageRequest.case, code: messageResponse.value.errorCode },
        messageResponse.value.errorMessage,
      );
    }
    await send({ validHost: request.host, originalRequest: request, messageResponse });
  }
}

function buildResponse(index: ReflectionIndex, request: ReflectionRequest): MessageResponse {
  const { messageRequest } = request;
  switch (messageRequest.case) {
    case "listServices":
      // grpc's reflection.proto documents that the content of list_services
      // "will not be checked", so every service is listed.
      return { case: "listServicesResponse", value: { service: index.serviceNames.map((name) => ({ name })) } };
    case "fileByFilename":
      return fileResponse(index, index.filesByPath.get(messageRequest.value), () =>
        `cannot find file "${messageRequest.value}": the server serves no file by that name`,
      );
    case "fileContainingSymbol":
      return fileResponse(index, index.filesBySymbol.get(messageRequest.value), () =>
        `cannot find symbol "${messageRequest.value}": no file served by the server declares it`,
      );
    case "fileContainingExtension":
      return extensionFileResponse(index, messageRequest.value.containingType, messageRequest.value.extensionNumber);
    case "allExtensionNumbersOfType":
      return extensionNumbersResponse(index, messageRequest.value);
    case undefined:
      return errorResponse(grpc.status.INVALID_ARGUMENT, "invalid reflection request: message_request is not set");
  }
}

/**
 * Builds a response with the file first, then every file it imports directly
 * or indirectly, each once. reflection.proto allows leaving out files sent
 * earlier on the same stream, but sending all keeps each response complete.
 */
function fileResponse(
  index: ReflectionIndex,
  file: DescFile | undefined,
  notFoundMessage: () => string,
): MessageResponse {
  if (file === undefined) return errorResponse(grpc.status.NOT_FOUND, notFoundMessage());
  const fileDescriptorProto: Uint8Array[] = [];
  const seen = new Set<DescFile>();
  const pending = [file];
  for (let next = pending.shift(); next !== undefined; next = pending.shift()) {
    if (seen.has(next)) continue;
    seen.add(next);
    fileDescriptorProto.push(encodedFile(index, next));
    pending.push(...next.dependencies);
  }
  return { case: "fileDescriptorResponse", value: { fileDescriptorProto } };
}

function extensionFileResponse(index: ReflectionIndex, extendee: string, extensionNumber: number): MessageResponse {
  const extension = index.extensionsByExtendee.get(extendee)?.find((candidate) => candidate.number === extensionNumber);
  return fileResponse(index, extension?.file, () =>
    `cannot find extension ${extensionNumber} of "${extendee}": no file served by the server declares it`,
  );
}

function extensionNumbersResponse(index: ReflectionIndex, typeName: string): MessageResponse {
  if (!index.messageNames.has(typeName)) {
    return errorResponse(
      grpc.status.NOT_FOUND,
      `cannot list extension numbers of "${typeName}": no file served by the server declares a message by that name`,
    );
  }
  const extensionNumber = (index.extensionsByExtendee.get(typeName) ?? []).map((extension) => extension.number);
  return { case: "allExtensionNumbersResponse", value: { baseTypeName: typeName, extensionNumber } };
}

function encodedFile(index: ReflectionIndex, file: DescFile): Uint8Array {
  const encoded = index.encodedFiles.get(file);
  // Every import was encoded when the index was built, so a miss is a bug here.
  if (encoded === undefined) throw new Error(`reflection index has no encoding of "${file.proto.name}"`);
  return encoded;
}

function errorResponse(code: grpc.status, message: string): MessageResponse {
  return { case: "errorResponse", value: { errorCode: code, errorMessage: message } };
}

/**
 * Yields from `source` until it ends or `signal` aborts, and then throws the
 * abort reason. A bidi stream whose client keeps its side open would
 * otherwise hold the handler past a server shutdown.
 */
async function* untilAborted<T>(source: AsyncIterable<T>, signal: AbortSignal): AsyncGenerator<T> {
  const iterator = source[Symbol.asyncIterator]();
  const aborted = new Promise<never>((_resolve, reject) => {
    const onAbort = (): void => reject(signal.reason);
    if (signal.aborted) onAbort();
    else signal.addEventListener("abort", onAbort, { once: true });
  });
  // Marks the rejection as handled for the case where no race is waiting on it.
  aborted.catch(() => undefined);
  for (;;) {
    signal.throwIfAborted();
    const next = iterator.next();
    // A read that loses the race to the abort may still fail later, once the call is torn down.
    next.catch(() => undefined);
    const result = await Promise.race([next, aborted]);
    if (result.done === true) return;
    yield result.value;
  }
}
