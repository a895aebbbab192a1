package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
)

// Doer sends a request to the API server with the CA's credentials; a
// request URL without host is a path under the server (authn.KubeAPI).
type Doer interface {
	Do(*http.Request) (*http.Response, error)
}

// Sentinel errors a caller may branch on.
var (
	// ErrForbidden: the API server refused the CA's identity (RBAC).
	ErrForbidden = errors.New("forbidden")
	// ErrNotInstalled: the resource's CRD is not installed.
	ErrNotInstalled = errors.New("custom resource definition not installed")
	// errGone: the watch's resourceVersion is too old; list again.
	errGone = errors.New("resource version too old")
)

// Bounds on what is read from the API server.
const (
	listPageSize   = 500
	maxListPage    = 32 << 20 // one page of up to listPageSize objects
	maxWatchEvent  = 4 << 20  // one watch event (etcd stores at most 1.5 MiB an object)
	watchTimeout   = 5 * 60   // seconds; the server ends the watch, we resume from the last version
	maxErrorDetail = 4 << 10
)

// apiStatus is the part of a Kubernetes Status the mirror reads.
type apiStatus struct {
	Kind    string `json:"kind"`
	Message string `json:"message"`
	Reason  string `json:"reason"`
	Code    int    `json:"code"`
}

// statusError turns a non-200 response into an error naming the resource
// and verb; 403 and 404 wrap ErrForbidden and ErrNotInstalled.
func statusError(r Resource, verb string, resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorDetail))
	var st apiStatus
	msg := string(body)
	if json.Unmarshal(body, &st) == nil && st.Message != "" {
		msg = st.Message
	}
	switch resp.StatusCode {
	case http.StatusForbidden:
		return fmt.Errorf("%w: %s %s (cluster-wide): the CA's service account needs list and watch on %s (ClusterRole meshproxy-ca-istio-config): %s",
			ErrForbidden, verb, r.Name(), r.Name(), msg)
	case http.StatusNotFound:
		return fmt.Errorf("%s %s: %w (install Istio's CRDs): %s", verb, r.Name(), ErrNotInstalled, msg)
	case http.StatusGone:
		return fmt.Errorf("%s %s: %w: %s", verb, r.Name(), errGone, msg)
	}
	return fmt.Errorf("%s %s: API server answered %s: %s", verb, r.Name(), resp.Status, msg)
}

// objectList is a list response: the items and the version to watch from.
type objectList struct {
	Metadata struct {
		ResourceVersion string `json:"resourceVersion"`
		Continue        string `json:"continue"`
	} `json:"metadata"`
	Items []json.RawMessage `json:"items"`
}

// list reads every object of r, page by page, and the resourceVersion to
// watch from.
func list(ctx context.Context, api Doer, r Resource) ([]json.RawMessage, string, error) {
	var (
		items []json.RawMessage
		cont  string
	)
	for {
		q := url.Values{"limit": {strconv.Itoa(listPageSize)}}
		if cont != "" {
			q.Set("continue", cont)
		}
		var page objectList
		if err := getJSON(ctx, api, r, "list", r.path()+"?"+q.Encode(), &page); err != nil {
			return nil, "", err
		}
		items = append(items, page.Items...)
		if page.Metadata.Continue == "" {
			return items, page.Metadata.ResourceVersion, nil
		}
		cont = page.Metadata.Continue
	}
}

func getJSON(ctx context.Context, api Doer, r Resource, verb, path string, dst any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, path, nil)
	if err != nil {
		return fmt.Errorf("%s %s: %w", verb, r.Name(), err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := api.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", verb, r.Name(), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return statusError(r, verb, resp)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxListPage+1))
	if err != nil {
		return fmt.Errorf("%s %s: %w", verb, r.Name(), err)
	}
	if len(body) > maxListPage {
		return fmt.Errorf("%s %s: response page larger than %d bytes", verb, r.Name(), maxListPage)
	}
	if err := json.Unmarshal(body, dst); err != nil {
		return fmt.Errorf("%s %s: bad response: %w", verb, r.Name(), err)
	}
	return nil
}

// watchEvent is one event of a watch stream.
type watchEvent struct {
	Type   string          `json:"type"`
	Object json.RawMessage `json:"object"`
}

// watch follows r from resourceVersion rv, calling on for every ADDED,
// MODIFIED or DELETED event, until the server ends the stream (nil), ctx
// ends, or an error; *rv follows the events and bookmarks, so the caller
// resumes where the stream stopped. errGone means: list again.
func watch(ctx context.Context, api Doer, r Resource, rv *string, on func(typ string, obj json.RawMessage) error) error {
	q := url.Values{
		"watch":               {"1"},
		"resourceVersion":     {*rv},
		"allowWatchBookmarks": {"true"},
		"timeoutSeconds":      {strconv.Itoa(watchTimeout)},
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.path()+"?"+q.Encode(), nil)
	if err != nil {
		return fmt.Errorf("watch %s: %w", r.Name(), err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := api.Do(req)
	if err != nil {
		return fmt.Errorf("watch %s: %w", r.Name(), err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return statusError(r, "watch", resp)
	}
	body := &eventReader{r: resp.Body}
	dec := json.NewDecoder(body)
	for {
		body.left = maxWatchEvent
		var ev watchEvent
		if err := dec.Decode(&ev); err != nil {
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("watch %s: %w", r.Name(), err)
		}
		var meta struct {
			Metadata struct {
				ResourceVersion string `json:"resourceVersion"`
			} `json:"metadata"`
		}
		switch ev.Type {
		case "ERROR":
			var st apiStatus
			_ = json.Unmarshal(ev.Object, &st)
			if st.Code == http.StatusGone {
				return fmt.Errorf("watch %s: %w: %s", r.Name(), errGone, st.Message)
			}
			return fmt.Errorf("watch %s: API server error %d %s: %s", r.Name(), st.Code, st.Reason, st.Message)
		case "BOOKMARK":
		case "ADDED", "MODIFIED", "DELETED":
			if err := on(ev.Type, ev.Object); err != nil {
				return fmt.Errorf("watch %s: %w", r.Name(), err)
			}
		default:
			return fmt.Errorf("watch %s: unknown event type %q", r.Name(), ev.Type)
		}
		if err := json.Unmarshal(ev.Object, &meta); err == nil && meta.Metadata.ResourceVersion != "" {
			*rv = meta.Metadata.ResourceVersion
		}
	}
}

// eventReader bounds how much one watch event may read.
type eventReader struct {
	r    io.Reader
	left int
}

func (e *eventReader) Read(p []byte) (int, error) {
	if e.left <= 0 {
		return 0, fmt.Errorf("watch event larger than %d bytes", maxWatchEvent)
	}
	if len(p) > e.left {
		p = p[:e.left]
	}
	n, err := e.r.Read(p)
	e.left -= n
	return n, err
}
