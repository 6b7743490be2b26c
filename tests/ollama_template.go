// Renders a chat as Ollama does for /api/chat, for tests/test_gguf.py: the steps of Ollama's
// template/template.go (collate the messages, then execute the template with them) with Go's
// text/template, the engine Ollama runs. Reads {"template": "...", "messages": [{"role": ...,
// "content": ...}]} on stdin and prints the prompt.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// collate as Ollama does: consecutive messages of one role become one, joined by a blank line, and the
// system messages together are .System.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	system, messages := collate(in.Messages)
	err = tmpl.Execute(os.Stdout, map[string]any{"System": system, "Messages": messages, "Response": ""})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
}
