import { status as GrpcStatus } from "@grpc/grpc-js";

/**
 * A deliberate error of the daemon: its code and message reach the client as
 * they are. Anything else thrown inside a handler becomes INTERNAL with a
 * generic message, and is logged in full on the server.
 */
export class ServiceError extends Error {
  override readonly name = "ServiceError";

  constructor(
    readonly code: GrpcStatus,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export function invalidArgument(message: string): ServiceError {
  return new ServiceError(GrpcStatus.INVALID_ARGUMENT, message);
}

export function failedPrecondition(message: string): ServiceError {
  return new ServiceError(GrpcStatus.FAILED_PRECONDITION, message);
}

export function resourceExhausted(message: string): ServiceError {
  return new ServiceError(GrpcStatus.RESOURCE_EXHAUSTED, message);
}

export function deadlineExceeded(message: string): ServiceError {
  return new ServiceError(GrpcStatus.DEADLINE_EXCEEDED, message);
}

export function unavailable(message: string, cause?: unknown): ServiceError {
  return new ServiceError(GrpcStatus.UNAVAILABLE, message, { cause });
}

export function cancelled(message: string): ServiceError {
  return new ServiceError(GrpcStatus.CANCELLED, message);
}

export function isServiceError(error: unknown): error is ServiceError {
  return error instanceof ServiceError;
}
