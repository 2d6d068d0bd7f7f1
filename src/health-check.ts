import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import * as grpc from "@grpc/grpc-js";
import {
  HealthCheckRequestSchema,
  HealthCheckResponse_ServingStatus,
  HealthCheckResponseSchema,
  type HealthCheckRequest,
  type HealthCheckResponse,
} from "./gen/grpc/health/v1/health_pb.js";

/**
 * Asks a daemon's grpc.health.v1 service for the status of `service` ("" for
 * the whole server). Resolves to the status name, such as "SERVING"; rejects
 * when the daemon does not respond within `timeoutMs`.
 */
export async function checkHealth(address: string, service: string, timeoutMs: number): Promise<string> {
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  try {
    const response = await new Promise<HealthCheckResponse>((resolve, reject) => {
      client.makeUnaryRequest<HealthCheckRequest, HealthCheckResponse>(
        "/grpc.health.v1.Health/Check",
        (message) => Buffer.from(toBinary(HealthCheckRequestSchema, message)),
        (bytes) => fromBinary(HealthCheckResponseSchema, bytes),
        create(HealthCheckRequestSchema, { service }),
        new grpc.Metadata(),
        { deadline: Date.now() + timeoutMs },
        (error, value) => (error === null && value !== undefined ? resolve(value) : reject(error)),
      );
    });
    return HealthCheckResponse_ServingStatus[response.status] ?? String(response.status);
  } finally {
    client.close();
  }
}
