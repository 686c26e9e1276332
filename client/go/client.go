// Package esm2 is a Go client of the ESM-2 8M gRPC service (esm2.v1.Esm2Service).
//
// It splits lists of sequences into requests of at most 8, runs them concurrently,
// reassembles each response stream (protos/README.md) and returns one result per
// sequence, in the caller's order, with every tensor decoded to float32.
package esm2

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	esm2v1 "esm2service/esm2/v1"
)

// MaxItemsPerRequest is the service's limit; longer lists are split.
const MaxItemsPerRequest = 8

// Options configure a Client; the zero value is a plaintext client with no deadline.
type Options struct {
	Token          string        // sent as "authorization: Token <token>" on every call
	TLS            *tls.Config   // nil: plaintext
	Timeout        time.Duration // deadline of each request; 0: none beyond the context's
	MaxConcurrency int           // requests in flight when a list is split; 0: 8
	BatchSize      int           // sequences per request, 1 to 8; 0: 8
}

// Client calls one service; safe for concurrent use. Close it when done.
type Client struct {
	conn    *grpc.ClientConn
	stub    esm2v1.Esm2ServiceClient
	options Options
	// Encode and Predict go packed (several responses to a message: less CPU at both
	// ends) until a server answers Unimplemented; then this client calls the plain ones.
	plainOnly atomic.Bool
}

// Dial connects to target ("host:port").
func Dial(target string, options Options) (*Client, error) {
	if options.MaxConcurrency == 0 {
		options.MaxConcurrency = 8
	}
	if options.BatchSize == 0 {
		options.BatchSize = MaxItemsPerRequest
	}
	if options.MaxConcurrency < 1 || options.BatchSize < 1 || options.BatchSize > MaxItemsPerRequest {
		return nil, fmt.Errorf("esm2: MaxConcurrency must be >= 1 and BatchSize 1 to %d", MaxItemsPerRequest)
	}
	transport := grpc.WithInsecure()
	if options.TLS != nil {
		transport = grpc.WithTransportCredentials(credentials.NewTLS(options.TLS))
	}
	conn, err := grpc.Dial(target, transport, grpc.WithDefaultCallOptions(grpc.ForceCodec(messageCodec{})))
	if err != nil {
		return nil, err
	}
	return &Client{conn: conn, stub: esm2v1.NewEsm2ServiceClient(conn), options: options}, nil
}

// Close closes the connection; calls in progress fail.
func (c *Client) Close() error { return c.conn.Close() }

// EncodeOptions choose Encode's outputs; the zero value asks for the last layer's mean.
type EncodeOptions struct {
	Include    []string // any of mean, per_token, bos, contacts, logits, attentions; nil: mean
	ReprLayers []int    // layers 0 to 6 (-1 is 6) for mean, per_token and bos; nil: -1
	Dtype      string   // wire precision: float32 (default), float16 or bfloat16
}

// EncodeResult is what Encode returned for one sequence. Per-layer maps are keyed by
// the resolved layer 0 to 6; tensors not asked for are nil.
type EncodeResult struct {
	SequenceIndex int            // position in the caller's list
	Embeddings    map[int]Tensor // mean over residues: [320]
	PerToken      map[int]Tensor // [L, 320]
	Bos           map[int]Tensor // [320]
	Contacts      *Tensor        // [L, L]
	Logits        *Tensor        // [L, 33], columns in VocabTokens order
	Attentions    *Tensor        // [20, L, L], last layer
	VocabTokens   []string
	Model         *esm2v1.ModelInfo // Model.RandomWeights: the service runs random weights
}

// PredictResult is what Predict returned for one sequence.
type PredictResult struct {
	SequenceIndex  int
	Logits         Tensor   // [n_masked, 33], one row per <mask>, columns in VocabTokens order
	SequenceTokens []string // the tokenized input, "<mask>" as one token
	VocabTokens    []string
	Model          *esm2v1.ModelInfo
}

var includeNames = map[string]esm2v1.Include{
	"mean": esm2v1.Include_INCLUDE_MEAN, "per_token": esm2v1.Include_INCLUDE_PER_TOKEN,
	"bos": esm2v1.Include_INCLUDE_BOS, "contacts": esm2v1.Include_INCLUDE_CONTACTS,
	"logits": esm2v1.Include_INCLUDE_LOGITS, "attentions": esm2v1.Include_INCLUDE_ATTENTIONS,
}

var dtypeNames = map[string]esm2v1.Dtype{
	"": esm2v1.Dtype_DTYPE_FLOAT32, "float32": esm2v1.Dtype_DTYPE_FLOAT32,
	"float16": esm2v1.Dtype_DTYPE_FLOAT16, "bfloat16": esm2v1.Dtype_DTYPE_BFLOAT16,
}

func parseDtype(name string) (esm2v1.Dtype, error) {
	if dtype, ok := dtypeNames[name]; ok {
		return dtype, nil
	}
	return 0, fmt.Errorf("esm2: unknown dtype %q; valid: float32, float16, bfloat16", name)
}

// Encode returns embeddings and other tensors of sequences, one result per sequence.
// Errors are *Error (the server refused or failed a request) or *StreamError.
func (c *Client) Encode(ctx context.Context, sequences []string, options EncodeOptions) ([]EncodeResult, error) {
	params, err := encodeParams(options)
	if err != nil {
		return nil, err
	}
	layers := options.ReprLayers
	if len(layers) == 0 {
		layers = []int{-1}
	}
	results := make([]EncodeResult, len(sequences))
	err = c.run(ctx, sequences, func(ctx context.Context, items []*esm2v1.Item, packed bool) (stream, error) {
		if packed {
			call, err := c.stub.EncodePacked(ctx, &esm2v1.EncodePackedRequest{Items: items, Params: params})
			return streamOf(call, func() ([]response, error) {
				message, err := call.Recv()
				return responses(message.GetResponses()), err
			}), err
		}
		call, err := c.stub.Encode(ctx, &esm2v1.EncodeRequest{Items: items, Params: params})
		return streamOf(call, func() ([]response, error) {
			message, err := call.Recv()
			return []response{message}, err
		}), err
	}, func(index int, item completedItem) error {
		result, err := encodeResult(index, item, params.GetInclude(), layers)
		results[index] = result
		return err
	})
	if err != nil {
		return nil, err
	}
	return results, nil
}

func encodeParams(options EncodeOptions) (*esm2v1.EncodeParams, error) {
	params := &esm2v1.EncodeParams{}
	include := options.Include
	if len(include) == 0 {
		include = []string{"mean"}
	}
	for _, name := range include {
		kind, ok := includeNames[name]
		if !ok {
			return nil, fmt.Errorf("esm2: unknown include %q; valid: mean, per_token, bos, contacts, logits, attentions", name)
		}
		params.Include = append(params.Include, kind)
	}
	for _, layer := range options.ReprLayers {
		params.ReprLayers = append(params.ReprLayers, int32(layer))
	}
	dtype, err := parseDtype(options.Dtype)
	params.Dtype = dtype
	return params, err
}

// Predict returns the logits at the <mask> tokens of each sequence, one result per
// sequence; each needs at least one "<mask>". dtype: "" or "float32", "float16", "bfloat16".
func (c *Client) Predict(ctx context.Context, sequences []string, dtype string) ([]PredictResult, error) {
	wire, err := parseDtype(dtype)
	if err != nil {
		return nil, err
	}
	results := make([]PredictResult, len(sequences))
	err = c.run(ctx, sequences, func(ctx context.Context, items []*esm2v1.Item, packed bool) (stream, error) {
		params := &esm2v1.PredictParams{Dtype: wire}
		if packed {
			call, err := c.stub.PredictPacked(ctx, &esm2v1.PredictPackedRequest{Items: items, Params: params})
			return streamOf(call, func() ([]response, error) {
				message, err := call.Recv()
				return responses(message.GetResponses()), err
			}), err
		}
		call, err := c.stub.Predict(ctx, &esm2v1.PredictRequest{Items: items, Params: params})
		return streamOf(call, func() ([]response, error) {
			message, err := call.Recv()
			return []response{message}, err
		}), err
	}, func(index int, item completedItem) error {
		logits, err := item.single(esm2v1.Include_INCLUDE_LOGITS)
		if err == nil && logits == nil {
			err = streamError("item %d: no logits tensor", index)
		}
		if err != nil {
			return err
		}
		results[index] = PredictResult{
			SequenceIndex:  index,
			Logits:         *logits,
			SequenceTokens: item.complete.GetSequenceTokens(),
			VocabTokens:    item.complete.GetVocabTokens(),
			Model:          item.complete.GetModel(),
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return results, nil
}

// Status returns the service's live workers, their models and the queue depth.
func (c *Client) Status(ctx context.Context) (*esm2v1.GetStatusResponse, error) {
	ctx, cancel := c.callContext(ctx)
	defer cancel()
	var trailer metadata.MD
	response, err := c.stub.GetStatus(ctx, &esm2v1.GetStatusRequest{}, grpc.Trailer(&trailer))
	if err != nil {
		return nil, callError(err, trailer, 0)
	}
	return response, nil
}

func (c *Client) callContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if c.options.Token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Token "+c.options.Token)
	}
	if c.options.Timeout > 0 {
		return context.WithTimeout(ctx, c.options.Timeout)
	}
	return context.WithCancel(ctx)
}

// stream is one call's response stream, whichever RPC it belongs to: recv returns the
// responses of its next message (one, or a packed message's several).
type stream struct {
	recv    func() ([]response, error)
	trailer func() metadata.MD
}

func streamOf(call grpc.ClientStream, recv func() ([]response, error)) stream {
	if call == nil {
		return stream{}
	}
	return stream{recv: recv, trailer: call.Trailer}
}

func responses[M response](messages []M) []response {
	out := make([]response, len(messages))
	for i, message := range messages {
		out[i] = message
	}
	return out
}

// startCall starts one request's call: the packed method (`packed`) or the plain one.
type startCall func(ctx context.Context, items []*esm2v1.Item, packed bool) (stream, error)

// run sends `sequences` in requests of BatchSize, MaxConcurrency at a time, and hands
// each completed item to `keep` with its index in `sequences`. Refusals
// (INVALID_ARGUMENT) of every request are merged into one *Error; any other failure
// cancels the rest and is returned.
func (c *Client) run(ctx context.Context, sequences []string, start startCall, keep func(int, completedItem) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		mutex    sync.Mutex
		failure  error
		refusals = map[int]*Error{}
		wait     sync.WaitGroup
		slots    = make(chan struct{}, c.options.MaxConcurrency)
	)
	for offset := 0; offset < len(sequences); offset += c.options.BatchSize {
		end := offset + c.options.BatchSize
		if end > len(sequences) {
			end = len(sequences)
		}
		wait.Add(1)
		go func(offset int, batch []string) {
			defer wait.Done()
			slots <- struct{}{}
			defer func() { <-slots }()
			items, err := c.runBatch(ctx, offset, batch, start)
			mutex.Lock()
			defer mutex.Unlock()
			if refusal, ok := err.(*Error); ok && refusal.Code == codes.InvalidArgument {
				refusals[offset] = refusal
				return
			}
			if err == nil {
				for i, item := range items {
					if err = keep(offset+i, item); err != nil {
						break
					}
				}
			}
			if err != nil && failure == nil {
				failure = err
				cancel()
			}
		}(offset, sequences[offset:end])
	}
	wait.Wait()
	if failure != nil {
		return failure
	}
	if len(refusals) > 0 {
		return mergeRefusals(refusals)
	}
	return nil
}

func (c *Client) runBatch(ctx context.Context, offset int, batch []string, start startCall) ([]completedItem, error) {
	callCtx, cancel := c.callContext(ctx)
	defer cancel()
	items := make([]*esm2v1.Item, len(batch))
	for i, sequence := range batch {
		items[i] = &esm2v1.Item{Sequence: sequence}
	}
	packed := !c.plainOnly.Load()
	call, err := start(callCtx, items, packed)
	if err != nil {
		return nil, callError(err, nil, offset)
	}
	assembler := newStreamAssembler(len(batch))
	for {
		messages, err := call.recv()
		if err == io.EOF {
			break
		}
		if packed && status.Code(err) == codes.Unimplemented { // a server from before them
			c.plainOnly.Store(true)
			return c.runBatch(ctx, offset, batch, start)
		}
		if err != nil {
			return nil, callError(err, call.trailer(), offset)
		}
		for _, message := range messages {
			if err := assembler.add(message); err != nil {
				return nil, err
			}
		}
	}
	return assembler.finish()
}

func encodeResult(index int, item completedItem, include []esm2v1.Include, layers []int) (EncodeResult, error) {
	for _, kind := range include {
		layered := kind == esm2v1.Include_INCLUDE_MEAN || kind == esm2v1.Include_INCLUDE_PER_TOKEN || kind == esm2v1.Include_INCLUDE_BOS
		if !layered {
			if tensor, err := item.single(kind); err != nil || tensor == nil {
				return EncodeResult{}, streamError("item %d: no %s tensor", index, kindName(kind))
			}
			continue
		}
		for _, layer := range layers {
			if layer < 0 {
				layer += 7
			}
			if _, ok := item.tensors[tensorKey{kind, int32(layer)}]; !ok {
				return EncodeResult{}, streamError("item %d: no %s tensor for layer %d", index, kindName(kind), layer)
			}
		}
	}
	result := EncodeResult{
		SequenceIndex: index,
		Embeddings:    item.byLayer(esm2v1.Include_INCLUDE_MEAN),
		PerToken:      item.byLayer(esm2v1.Include_INCLUDE_PER_TOKEN),
		Bos:           item.byLayer(esm2v1.Include_INCLUDE_BOS),
		VocabTokens:   item.complete.GetVocabTokens(),
		Model:         item.complete.GetModel(),
	}
	var err error
	for kind, target := range map[esm2v1.Include]**Tensor{
		esm2v1.Include_INCLUDE_CONTACTS: &result.Contacts, esm2v1.Include_INCLUDE_LOGITS: &result.Logits,
		esm2v1.Include_INCLUDE_ATTENTIONS: &result.Attentions,
	} {
		if *target, err = item.single(kind); err != nil {
			return EncodeResult{}, err
		}
	}
	return result, nil
}
