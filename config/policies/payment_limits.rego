# A custom payment policy in Rego (OPA's language), evaluated by regorus.
#
# Input:  {"signal": {id, tenant_id, sku_id, kind, critical, payload, ...},
#          "context": {"now_ms": N, "payments_last_minute": N}}
# Output: data.tai.payment_limits.decision =
#         {"allow": bool, "violations"?: [string], "score"?: number, "action"?: string}
package tai.payment_limits

default decision := {"allow": true}

decision := {"allow": false, "violations": violations, "score": 100} if {
	count(violations) > 0
}

# Hard ceiling per payment, whatever the fraud score says. (Rego orders
# every string after every number: without is_number, an amount sent as
# the string "9000" would read as over the ceiling.)
violations contains msg if {
	is_number(input.signal.payload.amount)
	input.signal.payload.amount > 10000
	msg := sprintf("amount %v over the 10000 ceiling", [input.signal.payload.amount])
}

violations contains "crypto currencies are not accepted" if {
	input.signal.payload.currency in {"BTC", "ETH"}
}

# A customer may not pay more than 20 times a minute at all.
violations contains msg if {
	input.context.payments_last_minute >= 20
	msg := sprintf("%v payments in the last minute", [input.context.payments_last_minute])
}
