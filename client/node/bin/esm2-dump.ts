// esm2-dump: runs the requests of a JSON spec (stdin) through the Node client and prints
// every result tensor as float32 bytes (base64), for the cross-client test
// (tests/clients). Usage: node dist/bin/esm2-dump.js --target host:port [--token T]
import { readFileSync } from "node:fs";

import { Esm2Client, Esm2Error, Tensor } from "../src";

interface Request {
  name: string;
  method: "encode" | "predict";
  sequences: string[];
  include?: string[];
  repr_layers?: number[];
  dtype?: string;
}

const pack = (t: Tensor) => ({ shape: t.shape, data: Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength).toString("base64") });

async function run(client: Esm2Client, r: Request) {
  try {
    if (r.method === "predict") {
      const results = await client.predict(r.sequences, (r.dtype ?? "float32") as "float32");
      return {
        results: results.map((p) => ({ index: p.sequenceIndex, tensors: { logits: pack(p.logits) }, vocab_tokens: p.vocabTokens, sequence_tokens: p.sequenceTokens })),
        error: null,
      };
    }
    const results = await client.encode(r.sequences, {
      include: r.include as never,
      reprLayers: r.repr_layers,
      dtype: (r.dtype ?? "float32") as "float32",
    });
    return {
      results: results.map((e) => {
        const tensors: Record<string, ReturnType<typeof pack>> = {};
        for (const [name, layers] of [["mean", e.embeddings], ["per_token", e.perToken], ["bos", e.bos]] as const) {
          for (const [layer, t] of layers) tensors[`${name}/${layer}`] = pack(t);
        }
        for (const [name, t] of [["contacts", e.contacts], ["logits", e.logits], ["attentions", e.attentions]] as const) {
          if (t) tensors[name] = pack(t);
        }
        return { index: e.sequenceIndex, tensors, vocab_tokens: e.vocabTokens, sequence_tokens: null };
      }),
      error: null,
    };
  } catch (error) {
    if (!(error instanceof Esm2Error)) throw error;
    const violations = error.violations.map((v) => [v.field, v.description]);
    return { results: [], error: { code: error.codeName, message: error.details, violations } };
  }
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const option = (name: string) => (args.includes(name) ? args[args.indexOf(name) + 1] : undefined);
  const spec: Request[] = JSON.parse(readFileSync(0, "utf8"));
  const client = new Esm2Client(option("--target") ?? "localhost:50051", { token: option("--token"), timeoutS: 300 });
  const out: Record<string, unknown> = {};
  try {
    for (const r of spec) out[r.name] = await run(client, r);
  } finally {
    client.close();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((error) => {
  console.error("esm2-dump:", error);
  process.exit(1);
});
