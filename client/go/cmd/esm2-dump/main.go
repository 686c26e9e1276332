// Command esm2-dump runs the requests of a JSON spec (stdin) through the Go client and
// prints every result tensor as float32 bytes (base64), for the cross-client test
// (tests/clients): the same requests through the Python, Node and Go clients must
// give bit-identical tensors and the same errors.
//
//	esm2-dump -target host:port [-token T] < spec.json > results.json
package main

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"time"

	esm2 "esm2service"
)

type request struct {
	Name       string   `json:"name"`
	Method     string   `json:"method"` // "encode" or "predict"
	Sequences  []string `json:"sequences"`
	Include    []string `json:"include"`
	ReprLayers []int    `json:"repr_layers"`
	Dtype      string   `json:"dtype"`
}

type tensor struct {
	Shape []int  `json:"shape"`
	Data  string `json:"data"` // base64 of little-endian float32
}

type result struct {
	Index          int               `json:"index"`
	Tensors        map[string]tensor `json:"tensors"`
	VocabTokens    []string          `json:"vocab_tokens"`
	SequenceTokens []string          `json:"sequence_tokens"`
}

type failure struct {
	Code       string      `json:"code"`
	Message    string      `json:"message"`
	Violations [][2]string `json:"violations"`
}

type outcome struct {
	Results []result `json:"results"`
	Error   *failure `json:"error"`
}

func main() {
	target := flag.String("target", "localhost:50051", "service host:port")
	token := flag.String("token", "", "send authorization: Token TOKEN")
	flag.Parse()
	var spec []request
	if err := json.NewDecoder(os.Stdin).Decode(&spec); err != nil {
		fail(err)
	}
	client, err := esm2.Dial(*target, esm2.Options{Token: *token, Timeout: 5 * time.Minute})
	if err != nil {
		fail(err)
	}
	defer client.Close()
	out := map[string]outcome{}
	for _, r := range spec {
		out[r.Name] = run(client, r)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail(err)
	}
}

func run(client *esm2.Client, r request) outcome {
	ctx := context.Background()
	var results []result
	var err error
	if r.Method == "predict" {
		var predicted []esm2.PredictResult
		predicted, err = client.Predict(ctx, r.Sequences, r.Dtype)
		for _, p := range predicted {
			results = append(results, result{p.SequenceIndex, map[string]tensor{"logits": pack(p.Logits)}, p.VocabTokens, p.SequenceTokens})
		}
	} else {
		var encoded []esm2.EncodeResult
		options := esm2.EncodeOptions{Include: r.Include, ReprLayers: r.ReprLayers, Dtype: r.Dtype}
		encoded, err = client.Encode(ctx, r.Sequences, options)
		for _, e := range encoded {
			results = append(results, result{e.SequenceIndex, encodeTensors(e), e.VocabTokens, nil})
		}
	}
	if err == nil {
		return outcome{Results: results}
	}
	rpcErr, ok := err.(*esm2.Error)
	if !ok {
		fail(err)
	}
	f := &failure{Code: codeName(rpcErr), Message: rpcErr.Message, Violations: [][2]string{}}
	for _, v := range rpcErr.Violations {
		f.Violations = append(f.Violations, [2]string{v.Field, v.Description})
	}
	return outcome{Results: []result{}, Error: f}
}

func encodeTensors(e esm2.EncodeResult) map[string]tensor {
	out := map[string]tensor{}
	for name, layers := range map[string]map[int]esm2.Tensor{"mean": e.Embeddings, "per_token": e.PerToken, "bos": e.Bos} {
		for layer, t := range layers {
			out[fmt.Sprintf("%s/%d", name, layer)] = pack(t)
		}
	}
	for name, t := range map[string]*esm2.Tensor{"contacts": e.Contacts, "logits": e.Logits, "attentions": e.Attentions} {
		if t != nil {
			out[name] = pack(*t)
		}
	}
	return out
}

func pack(t esm2.Tensor) tensor {
	raw := make([]byte, 4*len(t.Data))
	for i, value := range t.Data {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(value))
	}
	return tensor{Shape: t.Shape, Data: base64.StdEncoding.EncodeToString(raw)}
}

// codeName is the status code as the other clients name it: INVALID_ARGUMENT, ...
func codeName(err *esm2.Error) string { return esm2.CodeName(err.Code) }

func fail(err error) {
	fmt.Fprintln(os.Stderr, "esm2-dump:", err)
	os.Exit(1)
}
