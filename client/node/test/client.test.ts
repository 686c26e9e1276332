import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { Esm2Client, Esm2Error } from "../src";
import { mergeRefusals, shiftItem } from "../src/errors";
import { Dtype, EncodeRequest, EncodeResponse, Esm2ServiceService, Include } from "../src/gen/esm2/v1/esm2";
import { StreamAssembler, TensorAssembler, decodeFloats, float16ToFloat32 } from "../src/tensor";
import { Server, ServerCredentials, ServerWritableStream, status } from "@grpc/grpc-js";

describe("decoding and reassembly, without a service", () => {
  it("widens float16 exactly", () => {
    const cases: [number, number][] = [
      [0x3c00, 1], [0xc000, -2], [0x3555, 0.333251953125], [0x7bff, 65504],
      [0x0001, 2 ** -24], [0x03ff, 1023 * 2 ** -24], [0x7c00, Infinity], [0xfc00, -Infinity],
    ];
    for (const [bits, want] of cases) assert.equal(float16ToFloat32(bits), want, `0x${bits.toString(16)}`);
    assert.ok(Object.is(float16ToFloat32(0x8000), -0));
    assert.ok(Number.isNaN(float16ToFloat32(0x7e00)));
  });

  it("reads bfloat16 as the upper half of float32", () => {
    const decoded = decodeFloats(new Uint8Array([0x80, 0x3f, 0x49, 0xc0]), Dtype.DTYPE_BFLOAT16);
    assert.deepEqual([...decoded], [1, new Float32Array(new Uint32Array([0xc0490000]).buffer)[0]]);
  });

  const chunk = (offset: number, data: number[], shape: number[]) => ({
    kind: Include.INCLUDE_CONTACTS,
    layer: 0,
    offset,
    tensor: { dtype: Dtype.DTYPE_FLOAT32, shape, data: Buffer.from(new Float32Array(data).buffer) },
  });

  it("reassembles chunks in any order and refuses bad ones", () => {
    const assembler = new TensorAssembler(chunk(4, [2], [1, 2]).tensor);
    assembler.add(chunk(4, [2], [1, 2]));
    assert.equal(assembler.complete, false);
    assembler.add(chunk(0, [1], [1, 2]));
    assert.equal(assembler.complete, true);
    assert.deepEqual([...assembler.tensor().data], [1, 2]);
    assert.throws(() => assembler.add(chunk(6, [2], [1, 2])), /outside tensor of 8/);
    assert.throws(() => assembler.add(chunk(0, [1], [2, 1])), /dtype or shape/);
  });

  it("enforces the stream's rules", () => {
    const stream = new StreamAssembler(1);
    stream.add({ sequenceIndex: 0, chunk: chunk(0, [1], [2]) });
    assert.throws(
      () => stream.add({ sequenceIndex: 0, complete: { vocabTokens: [], sequenceTokens: [], model: undefined } }),
      /contacts layer 0 incomplete at the item's ItemComplete/,
    );
    assert.throws(() => new StreamAssembler(1).add({ sequenceIndex: 1 }), /outside the request's 1 items/);
    assert.throws(() => new StreamAssembler(2).finish(), /stream ended before items \[0,1\]/);
  });

  it("renumbers violations for the caller's list and merges refusals once each", () => {
    assert.equal(shiftItem("items[3].sequence", 16), "items[19].sequence");
    assert.equal(shiftItem("params.repr_layers[0]", 16), "params.repr_layers[0]");
    const layer = { field: "params.repr_layers[0]", description: "layer 9 is outside -7..6" };
    const merged = mergeRefusals(
      new Map([
        [8, new Esm2Error(status.INVALID_ARGUMENT, "", [{ field: "items[10].sequence", description: "x" }, layer], undefined, ["b"])],
        [0, new Esm2Error(status.INVALID_ARGUMENT, "", [{ field: "items[3].sequence", description: "y" }, layer], undefined, ["a"])],
      ]),
    );
    assert.deepEqual(merged.violations.map((v) => v.field), ["items[3].sequence", "items[10].sequence", "params.repr_layers[0]"]);
    assert.deepEqual(merged.requestIds, ["a", "b"]);
  });
});

describe("against a server without the packed methods", () => {
  it("calls EncodePacked once, then Encode for good", async () => {
    const calls: string[] = [];
    const mean = (index: number) => ({
      sequenceIndex: index,
      chunk: {
        kind: Include.INCLUDE_MEAN,
        layer: 6,
        offset: 0,
        tensor: { dtype: Dtype.DTYPE_FLOAT32, shape: [2], data: Buffer.from(new Float32Array([index, 1]).buffer) },
      },
    });
    const done = (index: number) => ({ sequenceIndex: index, complete: { vocabTokens: [], sequenceTokens: [], model: undefined } });
    const server = new Server();
    server.addService(Esm2ServiceService, {
      encode: (call: ServerWritableStream<EncodeRequest, EncodeResponse>) => {
        calls.push("Encode");
        call.request.items.forEach((_, index) => {
          call.write(mean(index));
          call.write(done(index));
        });
        call.end();
      },
      encodePacked: (call: ServerWritableStream<EncodeRequest, unknown>) => {
        calls.push("EncodePacked"); // answered as a server without the method answers
        call.emit("error", { code: status.UNIMPLEMENTED, details: "Method not found!" });
      },
    });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (error, bound) =>
        error ? reject(error) : resolve(bound),
      ),
    );
    const c = new Esm2Client(`127.0.0.1:${port}`, { timeoutS: 30, maxConcurrency: 1 });
    try {
      const first = await c.encode(Array(10).fill("MKV"));
      const [again] = await c.encode(["MKV"]);
      assert.deepEqual(calls, ["EncodePacked", "Encode", "Encode", "Encode"]);
      assert.deepEqual(first.map((result) => result.embeddings.get(6)!.data[0]), [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]);
      assert.deepEqual([...again.embeddings.get(6)!.data], [0, 1]);
    } finally {
      c.close();
      server.forceShutdown();
    }
  });
});

// Against a live service: ESM2_TARGET (and ESM2_TOKEN when it requires one); the
// repository's test command (make test) starts one and sets both.
const target = process.env.ESM2_TARGET;
const token = process.env.ESM2_TOKEN;

describe("against a live service", { skip: target ? false : "ESM2_TARGET is unset: no live service" }, () => {
  const client = () => new Esm2Client(target!, { token, timeoutS: 120 });

  it("splits long lists, keeps their order and returns every output", async () => {
    const sequences = Array.from({ length: 19 }, (_, i) => "MKV" + "A".repeat(i));
    const all = ["mean", "per_token", "bos", "contacts", "logits", "attentions"] as const;
    const c = client();
    try {
      const results = await c.encode(sequences, { include: [...all], reprLayers: [-1, 0] });
      assert.equal(results.length, 19);
      results.forEach((result, i) => {
        const length = sequences[i].length;
        assert.equal(result.sequenceIndex, i);
        assert.deepEqual([...result.embeddings.keys()], [0, 6]);
        assert.equal(result.perToken.get(6)!.shape[0], length);
        assert.deepEqual(result.contacts!.shape, [length, length]);
        assert.deepEqual(result.logits!.shape, [length, 33]);
        assert.deepEqual(result.attentions!.shape.slice(1), [length, length]);
        assert.equal(result.vocabTokens.length, 33);
        assert.equal(result.model!.randomWeights, true);
      });
    } finally {
      c.close();
    }
  });

  it("predicts one row per mask", async () => {
    const c = client();
    try {
      const [first, second] = await c.predict(["MK<mask>AY<mask>", "<mask>"], "float16");
      assert.deepEqual(first.logits.shape, [2, 33]);
      assert.deepEqual(second.logits.shape, [1, 33]);
      assert.equal(first.sequenceTokens.join(""), "MK<mask>AY<mask>");
    } finally {
      c.close();
    }
  });

  it("names the invalid items of every request in the caller's list", async () => {
    const sequences = Array(12).fill("MKV");
    sequences[3] = "MKJ";
    sequences[10] = "MK<mask>V";
    const c = client();
    try {
      await assert.rejects(c.encode(sequences), (error: Esm2Error) => {
        assert.equal(error.codeName, "INVALID_ARGUMENT");
        assert.deepEqual(error.violations.map((v) => v.field), ["items[3].sequence", "items[10].sequence"]);
        assert.equal(error.requestIds.length, 2);
        return true;
      });
    } finally {
      c.close();
    }
  });

  it("is refused without the token when the service requires one", { skip: token ? false : "ESM2_TOKEN is unset" }, async () => {
    const anonymous = new Esm2Client(target!, { timeoutS: 30 });
    try {
      await assert.rejects(anonymous.status(), (error: Esm2Error) => error.codeName === "UNAUTHENTICATED");
    } finally {
      anonymous.close();
    }
    const c = client();
    try {
      assert.ok((await c.status()).workers.length > 0);
    } finally {
      c.close();
    }
  });
});
