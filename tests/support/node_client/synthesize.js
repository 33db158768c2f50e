// Calls tts.v1.SynthesisService/Synthesize on a running gateway and prints what came
// back as one JSON line: the client needs nothing but the .proto files, the way any
// third-party integration would start.
//
// usage: node synthesize.js HOST:PORT [TEXT]
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const address = process.argv[2];
const text = process.argv[3] || "Hello from Node. This is Chorus speaking.";
if (!address) {
  console.error("usage: node synthesize.js HOST:PORT [TEXT]");
  process.exit(2);
}

const protos = path.resolve(__dirname, "..", "..", "..", "protos");
const definition = protoLoader.loadSync("tts/v1/gateway.proto", {
  includeDirs: [protos],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const tts = grpc.loadPackageDefinition(definition).tts.v1;
const client = new tts.SynthesisService(address, grpc.credentials.createInsecure());

const request = {
  text,
  audio: { encoding: "AUDIO_ENCODING_WAV", sample_rate_hz: 16000 },
  sampling: { max_tokens: 70 },
};
const deadline = new Date(Date.now() + 120_000);
const call = client.Synthesize(request, { deadline });

let bytes = 0;
let chunks = 0;
let header = "";
let summary = null;
let afterSummary = 0;
call.on("data", (message) => {
  if (message.payload === "audio") {
    if (chunks === 0) header = Buffer.from(message.audio.data).subarray(0, 4).toString("latin1");
    bytes += message.audio.data.length;
    chunks += 1;
    if (summary) afterSummary += 1;
  } else if (message.payload === "summary") {
    summary = message.summary;
  }
});
call.on("error", (err) => {
  console.error(`Synthesize failed: ${err.code} ${err.details}`);
  process.exit(1);
});
call.on("end", () => {
  console.log(JSON.stringify({ bytes, chunks, header, afterSummary, summary }));
  client.close();
});
