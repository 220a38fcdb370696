// One roi.v1.RoIService/Pool call, encoded and decoded by protobufjs (through
// @grpc/proto-loader), not by anything of ours: a foreign client for the wire format.
//
//   node pool.js --address 127.0.0.1:50051 --request req.json --response resp.json
//
// req.json is a PoolRequest as proto-loader's objects spell it, with every Tensor's data as
// base64 (it becomes a Buffer); resp.json gets {id, output: {dtype, shape, data (base64)}} or
// {code, details} when the call fails.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, "")] = process.argv[i + 1];

const protoFile = path.resolve(__dirname, "..", "..", "protos", "roi", "v1", "roi.proto");
const definition = protoLoader.loadSync(protoFile, { keepCase: true, longs: String, enums: String, defaults: false, bytes: Buffer });
const roi = grpc.loadPackageDefinition(definition).roi.v1;

function withBuffers(value) {
  // Tensor messages: {dtype, shape, data}; data arrives as base64 text.
  if (Array.isArray(value)) return value.map(withBuffers);
  if (value && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = k === "data" && typeof v === "string" ? Buffer.from(v, "base64") : withBuffers(v);
    return out;
  }
  return value;
}

const request = withBuffers(JSON.parse(fs.readFileSync(args.request, "utf8")));
const client = new roi.RoIService(args.address, grpc.credentials.createInsecure(), {
  "grpc.max_receive_message_length": 256 << 20,
  "grpc.max_send_message_length": 256 << 20,
});
client.Pool(request, { deadline: Date.now() + 60000 }, (err, response) => {
  let result;
  if (err) {
    result = { code: err.code, details: err.details };
  } else {
    const out = response.output;
    result = { id: response.id, output: { dtype: out.dtype, shape: out.shape.map(Number), data: Buffer.from(out.data).toString("base64") } };
  }
  fs.writeFileSync(args.response, JSON.stringify(result));
  client.close();
});
