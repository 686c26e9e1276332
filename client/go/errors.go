package esm2

import (
	"fmt"
	"math"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// RequestIDKey is the trailer in which the frontend names every Encode and Predict call.
const RequestIDKey = "esm2-request-id"

// Violation is one invalid field of a request, as google.rpc.BadRequest names it, e.g.
// Field "items[27].sequence", Description "character 'a' at position 12 is not accepted".
type Violation struct {
	Field       string
	Description string
}

// Error is a failed call: its gRPC status code and message, every BadRequest violation
// (items numbered in the caller's list, however it was split into requests), the
// RetryInfo delay for RESOURCE_EXHAUSTED, and the request ids the frontend logged.
type Error struct {
	Code       codes.Code
	Message    string
	Violations []Violation
	RetryAfter float64 // seconds; 0 when the server sent no RetryInfo
	RequestIDs []string
}

func (e *Error) Error() string {
	text := fmt.Sprintf("esm2: %s: %s", e.Code, e.Message)
	for _, v := range e.Violations {
		text += fmt.Sprintf("\n  %s: %s", v.Field, v.Description)
	}
	return text
}

var itemField = regexp.MustCompile(`^items\[(\d+)\]`)

// shiftItem renames "items[i]..." of a request whose first item is the caller's
// `offset` to "items[offset+i]...".
func shiftItem(field string, offset int) string {
	return itemField.ReplaceAllStringFunc(field, func(match string) string {
		index, _ := strconv.Atoi(match[len("items[") : len(match)-1])
		return fmt.Sprintf("items[%d]", index+offset)
	})
}

// callError turns a gRPC error of the request starting at `offset` into an *Error.
func callError(err error, trailer metadata.MD, offset int) *Error {
	st := status.Convert(err)
	out := &Error{Code: st.Code(), Message: st.Message(), RequestIDs: trailer.Get(RequestIDKey)}
	for _, detail := range st.Details() {
		switch info := detail.(type) {
		case *errdetails.BadRequest:
			for _, v := range info.GetFieldViolations() {
				out.Violations = append(out.Violations, Violation{shiftItem(v.GetField(), offset), v.GetDescription()})
			}
		case *errdetails.RetryInfo:
			delay := info.GetRetryDelay()
			out.RetryAfter = float64(delay.GetSeconds()) + float64(delay.GetNanos())/1e9
		}
	}
	return out
}

// mergeRefusals makes one INVALID_ARGUMENT error of the refusals of several requests,
// given by the offset of each request's first item.
func mergeRefusals(refusals map[int]*Error) *Error {
	offsets := make([]int, 0, len(refusals))
	for offset := range refusals {
		offsets = append(offsets, offset)
	}
	sort.Ints(offsets)
	merged := &Error{Code: codes.InvalidArgument}
	seen := map[Violation]bool{}
	for _, offset := range offsets {
		refusal := refusals[offset]
		for _, v := range refusal.Violations {
			if !seen[v] { // a parameter's violation comes once from every request
				seen[v] = true
				merged.Violations = append(merged.Violations, v)
			}
		}
		merged.RequestIDs = append(merged.RequestIDs, refusal.RequestIDs...)
	}
	sortViolations(merged.Violations)
	merged.Message = violationsMessage(merged.Violations)
	return merged
}

// sortViolations puts item violations first, by item, then the others (parameters),
// each group in its original order: the order the service lists one request's in.
func sortViolations(violations []Violation) {
	item := func(v Violation) int {
		if match := itemField.FindStringSubmatch(v.Field); match != nil {
			index, _ := strconv.Atoi(match[1])
			return index
		}
		return math.MaxInt
	}
	sort.SliceStable(violations, func(i, j int) bool { return item(violations[i]) < item(violations[j]) })
}

// violationsMessage summarises violations as the service's own messages do:
// "invalid request: FIELD: TEXT; ... (and N more)", the first five named.
func violationsMessage(violations []Violation) string {
	var shown []string
	for i, v := range violations {
		if i == 5 {
			break
		}
		shown = append(shown, v.Field+": "+v.Description)
	}
	message := "invalid request: " + strings.Join(shown, "; ")
	if len(violations) > 5 {
		message += fmt.Sprintf(" (and %d more)", len(violations)-5)
	}
	return message
}

// CodeName is a status code's canonical name, as in the gRPC spec: "INVALID_ARGUMENT".
func CodeName(code codes.Code) string {
	name := code.String() // "InvalidArgument"
	var out []byte
	for i := 0; i < len(name); i++ {
		c := name[i]
		if 'A' <= c && c <= 'Z' && i > 0 {
			out = append(out, '_')
		}
		out = append(out, strings.ToUpper(string(c))[0])
	}
	return string(out)
}
