// Entra ID application permissions for the app's managed identity, through the Microsoft
// Graph Bicep extension (alias in infra/bicepconfig.json). A deployment of its own, which
// infra/deploy.sh runs after main.bicep when grantGraphUserReadAll, grantExchangeMailSend or
// grantGraphMessageTrace is true
// (inside main.bicep the new identity is not yet replicated in Entra: "Not a valid reference
// update"), with only the grants that do not exist yet. The deployer needs an Entra role that may
// grant application permissions (Privileged Role Administrator or Global Administrator): see
// infra/README.md.
extension microsoftGraphV1

@description('Principal (object) id of the app\'s user-assigned managed identity.')
param principalId string

@description('Grant Microsoft Graph User.Read.All (welcome scan of new users).')
param grantUserReadAll bool = true

@description('Grant the Office 365 Exchange Online application role Mail.Send for XOAUTH2 (HVE_AUTH=oauth).')
param grantExchangeMailSend bool = false

@description('Grant Microsoft Graph ExchangeMessageTrace.Read.All (delivery confirmation by message trace).')
param grantMessageTraceRead bool = false

// Well-known application ids of the first-party resource applications.
var microsoftGraphAppId = '00000003-0000-0000-c000-000000000000'
var exchangeOnlineAppId = '00000002-0000-0ff1-ce00-000000000000'

resource microsoftGraph 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: microsoftGraphAppId
}

resource exchangeOnline 'Microsoft.Graph/servicePrincipals@v1.0' existing = {
  appId: exchangeOnlineAppId
}

// Least privilege for the app-only GET /users scan (docs/hve-facts.md, "Graph for the welcome scan").
resource userReadAll 'Microsoft.Graph/appRoleAssignedTo@v1.0' = if (grantUserReadAll) {
  appRoleId: filter(microsoftGraph.appRoles, role => role.value == 'User.Read.All')[0].id
  principalId: principalId
  resourceId: microsoftGraph.id
}

// Secretless XOAUTH2 (docs/hve-facts.md, "Without any secret"): Office 365 Exchange Online Mail.Send,
// the application permission Microsoft documents for OAuth with HVE. The HVE account must also
// allow the identity: Add-HVEAppAccess (infra/README.md).
resource exchangeSend 'Microsoft.Graph/appRoleAssignedTo@v1.0' = if (grantExchangeMailSend) {
  appRoleId: filter(exchangeOnline.appRoles, role => role.value == 'Mail.Send')[0].id
  principalId: principalId
  resourceId: exchangeOnline.id
}

// Delivery confirmation (docs/hve-facts.md, "Message trace in Graph"): app-only GET /admin/exchange/tracing/messageTraces.
// The tenant also needs the service principal of app 8bd644d1-64a1-4d4b-ae52-2e0cbf64e373 (infra/README.md).
resource messageTraceRead 'Microsoft.Graph/appRoleAssignedTo@v1.0' = if (grantMessageTraceRead) {
  appRoleId: filter(microsoftGraph.appRoles, role => role.value == 'ExchangeMessageTrace.Read.All')[0].id
  principalId: principalId
  resourceId: microsoftGraph.id
}
