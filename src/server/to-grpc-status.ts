import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { isServiceError } from "./service-error.js";

export interface GrpcStatusObject {
  code: grpc.status;
  details: string;
  metadata: grpc.Metadata;
}

/**
 * Converts anything a handler threw into the status sent to the client. A
 * `ServiceError` keeps its code and message; anything else is logged in full
 * and becomes INTERNAL with a generic message, so no internals leak.
 */
export function toGrpcStatus(error: unknown, logger: Logger): GrpcStatusObject {
  if (isServiceError(error)) {
    if (error.cause !== undefined) logger.debug({ err: error.cause }, "cause of %s", grpc.status[error.code]);
    return { code: error.code, details: error.message, metadata: new grpc.Metadata() };
  }
  logger.error({ err: error }, "unexpected error in handler");
  return {
    code: grpc.status.INTERNAL,
    details: "internal error in the state daemon; its log has the details",
    metadata: new grpc.Metadata(),
  };
}
