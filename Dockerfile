# ModelMesh State Daemon image.
#
# Without a mounted configuration the daemon runs on config/default.yaml: the
# local-file connector, with its state file in the working folder
# /var/lib/modelmesh, which is writable by the runtime user and declared as a
# volume so that the state outlives the container. Mount a file and pass
# `--config FILE` to use etcd instead.

# Build stage: compiles the TypeScript sources into dist/.
FROM node:20-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
RUN npm run build

# Runtime stage: production dependencies, the compiled daemon and its default
# configuration, owned by root and run by the unprivileged user "node" that
# the base image provides.
FROM node:20-bookworm-slim AS runtime
ENV NODE_ENV=production \
    MODELMESH_LISTEN=0.0.0.0:50051
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force
COPY --from=build /app/dist ./dist
COPY config/default.yaml ./config/default.yaml
RUN mkdir -p /var/lib/modelmesh && chown node:node /var/lib/modelmesh
VOLUME /var/lib/modelmesh
WORKDIR /var/lib/modelmesh
USER node
EXPOSE 50051
# The health-check subcommand exits 0 only when grpc.health.v1 reports SERVING,
# which the daemon does once its state is loaded and its storage is reachable.
# The first check runs one interval after the start, so no start period is set.
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
  CMD ["node", "/app/dist/main.js", "health-check", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["node", "/app/dist/main.js"]
